"""Secrets in a spec: what a value that looks like one is (``secret_kind``), the string types that refuse
them (``Plain``, ``Prose``), and ``_short``, which cuts a user's value short for a message and never echoes one."""
from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator


def _short(value: str, limit: int = 60) -> str:
    """A user's value, cut short for an error message (a 10 MB value must not come back whole); a value that
    looks like a secret never comes back at all."""
    value = str(value)
    if secret_kind(value[: limit + 600]):  # only what is shown (and a key's length past it) can leak
        return "(a value hidden here: it looks like a secret)"
    return value if len(value) <= limit else value[:limit] + f"… ({len(value):,} characters)"


# ---------------------------------------------------------------------------- secrets
# A spec is copied into the Job's labels, annotations and ConfigMap, the run's logs and every published
# version: a secret in it leaks to whoever can read any of those. Credentials come from the cluster's Secrets.

#: Tokens with a published shape: (what it is, pattern). Anchored on what precedes them so "task-..." is not "sk-".
_TOKEN_SHAPES = [
    ("a Hugging Face token", re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}")),
    ("an AWS access key id", re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{16}(?![A-Za-z0-9])")),
    ("a GitHub token", re.compile(r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})")),
    ("a GitLab token", re.compile(r"(?<![A-Za-z0-9])glpat-[A-Za-z0-9_-]{20,}")),
    ("a Slack token", re.compile(r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,}")),
    ("an API key (sk-…)", re.compile(r"(?<![A-Za-z0-9])sk-(?:proj-|ant-)?[A-Za-z0-9_-]{32,}")),
    ("a JSON Web Token", re.compile(r"(?<![A-Za-z0-9])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.")),
    ("a private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
]
#: Query parameters of presigned URLs (S3, GCS, Azure SAS) and of tokens passed in a URL.
_SECRET_PARAMS = re.compile(
    r"[?&;](x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential|sig|signature|"
    r"token|access_token|auth|api_key|apikey|key|password|passwd|secret|client_secret)=", re.IGNORECASE)
#: A long unbroken run of token characters; judged by _looks_random.
_TOKEN_RUN = re.compile(r"[A-Za-z0-9+/=_-]{32,}")


def _looks_random(run: str) -> bool:
    """A run of 32+ token characters that mixes upper case, lower case and digits the way random keys do.
    Names do not: hex digests (one case), 'customer-support-llama-3-8b' (words), 'Meta-Llama-3-70B-Instruct'
    (few switches between letter classes once the separators are dropped, low entropy)."""
    body = re.sub(r"[-_+/=]", "", run[:512])  # a key is far shorter; a 10 MB run costs no more
    if len(body) < 28 or not (re.search(r"[A-Z]", body) and re.search(r"[a-z]", body) and re.search(r"\d", body)):
        return False
    cls = ["u" if c.isupper() else "l" if c.islower() else "d" for c in body]
    switches = sum(a != b for a, b in zip(cls, cls[1:])) / (len(cls) - 1)
    counts = {c: body.count(c) for c in set(body)}
    entropy = -sum(n / len(body) * math.log2(n / len(body)) for n in counts.values())
    return switches >= 0.45 and entropy >= 4.2


def secret_kind(value: Any, *, free_text: bool = False) -> str | None:
    """What secret ``value`` appears to hold ("an AWS access key id", "a presigned URL signature
    (X-Amz-Signature)", ...), or None. ``free_text`` (prompts, references) checks only the published token
    shapes and URLs with a signature or user:secret@ (prose may hold any word). Never returns the secret itself."""
    if not isinstance(value, str) or not value:
        return None
    for what, pattern in _TOKEN_SHAPES:
        if pattern.search(value):
            return what
    param = _SECRET_PARAMS.search(value)
    if param:
        return f"a signature or token in the URL (its {param.group(1)} parameter)"
    # a URI's user:secret@ part; in prose only with the ':' (ssh://git@host names no secret)
    # bounded repeats: a 10 MB value is scanned in linear time
    if re.search(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{0,30}://[^/?#\s@]{0,512}:[^/?#\s@]{0,512}@", value) or (
            not free_text and re.match(r"^[A-Za-z][A-Za-z0-9+.-]{0,30}://[^/?#@]{0,1024}@", value)):
        return "credentials in the URL (user:secret@)"
    if not free_text and any(_looks_random(run) for run in _TOKEN_RUN.findall(value)):
        return "a long random token"
    return None


def _refuse_secret(value: Any, *, free_text: bool = False) -> None:
    what = secret_kind(value, free_text=free_text)
    if what:
        raise ValueError(f"holds what looks like {what} (not shown here). A spec is copied into the Job's labels, "
                         "annotations and ConfigMap and into every published version, so it must hold no secret: "
                         "remove it; credentials come from the cluster's Secrets (the S3 Secret, "
                         "mlflow_token_secret), never from the spec")


def _no_secret(value: Any) -> Any:
    _refuse_secret(value)
    return value


def _no_secret_in_text(value: Any) -> Any:
    _refuse_secret(value, free_text=True)
    return value


#: A string that must hold no secret (names, paths, label values).
Plain = Annotated[str, AfterValidator(_no_secret)]
#: Prose (prompts, references): refused only for the published token shapes.
Prose = Annotated[str, AfterValidator(_no_secret_in_text)]
