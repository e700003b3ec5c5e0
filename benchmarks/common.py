"""What the benchmark scripts share: the model shape and the data of ../shared/bench/trl_baseline.py."""
from __future__ import annotations

import math
import random

# Llama-3-8B shape, as in trl_baseline.py
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 tie_word_embeddings=False)
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False)
MAX_LEN = 2048
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_rows(n_ex: int, vocab_size: int, data: str = "lognormal", max_len: int = MAX_LEN) -> list[dict]:
    """The baseline's rows: lengths lognormal (median ~350, mean ~455, capped at max_len), seed 0.

    ``data="lognormal"`` draws token ids uniformly, exactly like trl_baseline.py (the first rows are
    identical for any ``n_ex``). ``data="markov"`` keeps the lengths but draws the tokens from a
    learnable process (a fixed successor for each token of a 2,000-token subset, 70% of the time),
    so that a loss curve has something to go down on; used for the parity runs.
    """
    rng = random.Random(0)
    rows = []
    sub = None
    if data == "markov":
        r2 = random.Random(1234)
        sub = r2.sample(range(3, vocab_size), min(2000, vocab_size - 3))
        succ = {t: r2.choice(sub) for t in sub}
    for _ in range(n_ex):
        L = min(max_len, max(32, int(math.exp(rng.gauss(math.log(350), 0.8)))))
        if sub is None:
            ids = [rng.randrange(3, vocab_size) for _ in range(L)]
        else:
            ids = [rng.choice(sub)]
            for _ in range(L - 1):
                ids.append(succ[ids[-1]] if rng.random() < 0.7 else rng.choice(sub))
        rows.append({"input_ids": ids})
    return rows
