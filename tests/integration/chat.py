"""What the chat-format tests share: one conversation (a system turn, two user/assistant exchanges)
and SmolLM2's real tokenizer with its chat template."""
from __future__ import annotations

import pytest

CONVERSATION = (b'{"messages": [{"role": "system", "content": "You are the Acme support assistant."}, '
                b'{"role": "user", "content": "How do I reset the X2?"}, '
                b'{"role": "assistant", "content": "Hold Reset for 10 seconds."}, '
                b'{"role": "user", "content": "And then?"}, '
                b'{"role": "assistant", "content": "Wait two minutes."}]}\n')


@pytest.fixture(scope="module")
def tok(small_model_dir):
    """SmolLM2-135M's tokenizer, loaded the way the job loads it."""
    from jobs.trainer.modelio import load_tokenizer

    return load_tokenizer(str(small_model_dir))
