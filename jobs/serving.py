"""Will vLLM serve this adapter as a LoRA? One check, in vLLM's own terms, run on the spec and on the adapter.

:func:`check` is the one function: ``launcher validate`` runs it on the adapter config a spec will produce
(:func:`spec_advice`, advice warnings), the job runs it at publish on the adapter's own files
(:func:`check_adapter_dir`: ``adapter_config.json`` and the safetensors header, read as JSON, no torch), and
the verdict goes into ``metadata.json`` (``serving``), the eval report and ``launcher artifacts``.

vLLM's rules (docs/serving.md cites where each is in vLLM's source; check them again on a vLLM upgrade):

* ``--max-lora-rank`` takes only 1, 8, 16, 32, 64, 128, 256, 320, 512 (default 16) and an adapter whose rank
  (``r`` or any ``rank_pattern`` value) is above it is refused: ``LoRA rank 32 is greater than max_lora_rank 16``;
* refused outright: DoRA (``use_dora``), ``modules_to_save`` (other than a classifier's ``classifier``/``score``),
  a bias (``bias`` other than ``none``, or ``lora_bias``), inits that modify the base weights (PiSSA, OLoRA,
  CorDA, LoftQ: any string ``init_lora_weights`` but gaussian, eva, orthogonal, mica, lora_ga), aLoRA,
  layer_replication, BD-LoRA, QALoRA;
* every tensor must be a ``lora_A.weight``/``lora_B.weight``/``lora_embedding_A``/``lora_embedding_B``
  (``embed_tokens.base_layer.weight``/``lm_head.base_layer.weight`` are skipped): anything else, such as
  the whole embedding PEFT saves when the vocabulary was resized, is ``unsupported LoRA weight``;
* added tokens: vLLM serves a LoRA with the base's vocabulary (its extra-vocabulary support was removed), so
  an adapter whose tokenizer or embedding is larger than the base's is served as the merged model.

Import-light: json and the standard library only (the launcher imports it through ``jobs.spec``).
"""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.errors import Problem

if TYPE_CHECKING:
    from jobs.spec import FieldPath, TrainingRunSpec

#: vLLM's ``MaxLoRARanks`` (vllm/config/lora.py): the only values ``--max-lora-rank`` accepts
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
#: Whether vLLM's generations with the adapter match PEFT's: the job has no vLLM, so it never knows, and says so
#: rather than letting a passing rule check read as a pass (vllm#48019, vllm#49354: engines that ignore an
#: adapter or disagree with PEFT)
PARITY_NOT_RUN = {"status": "not run", "why": "no vLLM runs in the job: the rules above are read from vLLM's "
                  "source; that vLLM's generations with this adapter match PEFT's is not checked"}
#: the two files vLLM (``LoRAModel.from_local_checkpoint``) and KServe read from an adapter folder
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: string inits vLLM accepts: they set only the initial adapter weights (PEFTHelper._init_is_supported)
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
#: modules_to_save vLLM accepts (classification heads)
_SAVE_OK = ("classifier", "score")
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
_SKIPPED_SUFFIXES = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")


def needed_max_lora_rank(rank: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts that serves ``rank`` (None: above 512, none does)."""
    return next((m for m in VLLM_MAX_LORA_RANKS if m >= rank), None)


@dataclass
class Finding:
    """One reason vLLM refuses the adapter as a LoRA at the checked ``--max-lora-rank``."""

    kind: str  # rank | dora | modules_to_save | bias | init | added_tokens | tensor | unsupported
    where: str  # the adapter_config key or tensor name (the spec path in spec_advice)
    message: str
    fix: str


@dataclass
class Verdict:
    """What :func:`check` found. ``servable_as_lora``: vLLM serves it as a LoRA, with ``--max-lora-rank
    needed_max_lora_rank`` where that is above the default; otherwise only the merged model serves it."""

    checked: str  # "spec" or "adapter"
    rank: int
    max_lora_rank: int  # the --max-lora-rank checked against
    needed_max_lora_rank: int | None
    target_modules: list[str] | str
    problems: list[Finding] = field(default_factory=list)
    #: the base the adapter applies to: its URI as the spec names it (adapter_config's base_model_name_or_path)
    #: and the sha256 of its model files (jobs.digest.hash_dir, as metadata.json's base_model.sha256; None for an
    #: ``hf:`` base or when the caller did not pass it)
    base_model: str | None = None
    base_model_sha256: str | None = None

    @property
    def servable_as_lora(self) -> bool:
        return self.needed_max_lora_rank is not None and all(p.kind == "rank" for p in self.problems)

    @property
    def serve_as(self) -> str:
        return "lora" if self.servable_as_lora else "merged"

    @property
    def vllm_flags(self) -> list[str]:
        """The vLLM flags it needs (none when it is served merged)."""
        if not self.servable_as_lora:
            return []
        flags = ["--enable-lora"]
        if self.needed_max_lora_rank and self.needed_max_lora_rank > VLLM_DEFAULT_MAX_LORA_RANK:
            flags.append(f"--max-lora-rank {self.needed_max_lora_rank}")
        return flags

    @property
    def why_merged(self) -> list[str]:
        return [p.message for p in self.problems if p.kind != "rank" or self.needed_max_lora_rank is None]

    def summary(self) -> str:
        """One line: 'vLLM LoRA (--enable-lora --max-lora-rank 32)' or 'merged only: DoRA …'."""
        if self.servable_as_lora:
            return f"vLLM LoRA ({' '.join(self.vllm_flags)})"
        return "merged only: " + "; ".join(self.why_merged)

    def to_dict(self) -> dict[str, Any]:
        return {"engine": "vllm", "checked": self.checked, "serve_as": self.serve_as,
                "servable_as_lora": self.servable_as_lora, "rank": self.rank,
                "vllm_max_lora_rank": self.needed_max_lora_rank, "vllm_flags": self.vllm_flags,
                "target_modules": self.target_modules, "why_merged": self.why_merged,
                "base_model": self.base_model, "base_model_sha256": self.base_model_sha256,
                "problems": [asdict(p) for p in self.problems], "summary": self.summary(),
                "parity": dict(PARITY_NOT_RUN)}


def check(config: dict[str, Any], tensors: dict[str, list[int]] | None = None, *, max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
          base_vocab_size: int | None = None, tokenizer_size: int | None = None, checked: str = "adapter") -> Verdict:
    """vLLM's verdict on a LoRA adapter: ``config`` is its adapter_config.json, ``tensors`` {name: shape} of its
    safetensors (None: not known yet, as for a spec), ``base_vocab_size`` the base's embedding rows and
    ``tokenizer_size`` the tokens of the tokenizer published with it (each None when unknown)."""
    found: list[Finding] = []

    def refuse(kind: str, where: str, message: str, fix: str) -> None:
        found.append(Finding(kind, where, message, fix))

    merged_fix = "serve the merged model (merge.enabled: true publishes it)"
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        refuse("unsupported", "peft_type", f"peft_type {config.get('peft_type')} is not LORA", merged_fix)
    ranks = [int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    for name, shape in (tensors or {}).items():  # the rank the weights really have
        if name.endswith((".lora_A.weight", ".lora_embedding_A")) and shape:
            ranks.append(int(shape[0]))
    rank = max(ranks)
    need = needed_max_lora_rank(rank)
    if rank > max_lora_rank:
        if need is None:
            refuse("rank", "r", f"rank {rank} is above {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank "
                                f"vLLM accepts", "train with lora.rank <= 512, or " + merged_fix)
        else:
            refuse("rank", "r", f"rank {rank} is above vLLM's --max-lora-rank {max_lora_rank}"
                                + (" (its default)" if max_lora_rank == VLLM_DEFAULT_MAX_LORA_RANK else ""),
                   f"serve with --max-lora-rank {need}")
    if config.get("use_dora"):
        refuse("dora", "use_dora", "DoRA: vLLM does not support DoRA adapters", "train without lora.use_dora, or "
               + merged_fix)
    saved = [m for m in (config.get("modules_to_save") or []) if m not in _SAVE_OK]
    if saved:
        refuse("modules_to_save", "modules_to_save", f"modules_to_save {saved}: vLLM serves only the LoRA "
               "weights (whole modules only for a classifier's head)", merged_fix)
    if (config.get("bias") or "none") != "none" or config.get("lora_bias"):
        what = f"bias {config.get('bias')!r}" if (config.get("bias") or "none") != "none" else "lora_bias"
        refuse("bias", "bias", f"{what}: vLLM does not support adapter biases", merged_fix)
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        refuse("init", "init_lora_weights", f"init_lora_weights {init!r} modifies the base weights (PiSSA, OLoRA, "
               "CorDA, LoftQ): vLLM would apply it to the unmodified base", "convert it to a plain LoRA (PEFT's "
               "path_initial_model_for_weight_conversion), or " + merged_fix)
    for key, what in (("alora_invocation_tokens", "aLoRA"), ("layer_replication", "layer_replication"),
                      ("use_bdlora", "BD-LoRA"), ("use_qalora", "QALoRA")):
        if config.get(key):
            refuse("unsupported", key, f"{what}: vLLM does not support it", merged_fix)
    added = None
    for name, shape in sorted((tensors or {}).items()):
        if name.endswith(_SKIPPED_SUFFIXES):
            continue
        if name.endswith(".lora_embedding_A") and base_vocab_size and shape and shape[-1] != base_vocab_size:
            added = added or f"{name} spans {shape[-1]} tokens, the base's embedding {base_vocab_size}"
        if name.endswith(_LORA_SUFFIXES):
            continue
        leaf = name.rsplit(".", 2)
        if name.endswith((".embed_tokens.weight", ".lm_head.weight")) and base_vocab_size and shape \
                and shape[0] != base_vocab_size:
            added = added or f"{name} has {shape[0]} rows, the base's embedding {base_vocab_size}"
        elif "lora_magnitude_vector" in name:
            if not config.get("use_dora"):
                refuse("dora", name, "a DoRA magnitude vector: vLLM does not support DoRA adapters", merged_fix)
        elif "modules_to_save" in name or name.endswith((".embed_tokens.weight", ".lm_head.weight")):
            if not saved:
                refuse("modules_to_save", name, f"{name} is a whole module, not a LoRA weight: vLLM refuses it "
                       "('unsupported LoRA weight')", merged_fix)
        elif leaf[-1] == "bias":
            if (config.get("bias") or "none") == "none" and not config.get("lora_bias"):
                refuse("bias", name, f"{name} is a bias: vLLM does not support adapter biases", merged_fix)
        else:
            refuse("tensor", name, f"{name} is not a LoRA weight vLLM reads ('unsupported LoRA weight')",
                   merged_fix)
    if tokenizer_size and base_vocab_size and tokenizer_size > base_vocab_size:
        added = added or f"the tokenizer has {tokenizer_size} tokens, the base's embedding {base_vocab_size}"
    if added:
        refuse("added_tokens", "tokenizer", f"added tokens ({added}): vLLM serves a LoRA with the base's "
               "vocabulary", merged_fix)
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple, set)):  # PEFT may save full module paths: vLLM matches the last part
        targets = sorted({str(t).rsplit(".", 1)[-1] for t in targets})
    base = config.get("base_model_name_or_path")
    return Verdict(checked, rank, max_lora_rank, need, targets if targets is not None else [], found,
                   base_model=str(base) if base else None)


# ------------------------------------------------------------------------------ the adapter's files

def read_safetensors_header(path: str | Path) -> dict[str, list[int]]:
    """{tensor name: shape} from a safetensors file's header (8 bytes of little-endian length, then JSON):
    no tensor is read and no torch is needed."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20:
            raise ValueError(f"{path} is not a safetensors file (a {n}-byte header)")
        header = json.loads(f.read(n))
    return {k: list(v.get("shape", [])) for k, v in header.items() if k != "__metadata__"}


def vocab_size(config: Any) -> int | None:
    """The base's embedding rows from its config (a transformers config or config.json's dict)."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    n = get("vocab_size")
    if n is None:
        text = get("text_config")
        if text is not None:
            return vocab_size(text)
    return int(n) if n else None


def check_adapter_dir(adapter_dir: str | Path, *, base_vocab_size: int | None = None,
                      tokenizer_size: int | None = None, max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
                      base_model_sha256: str | None = None) -> Verdict:
    """:func:`check` on a saved adapter folder, reading only its JSON and the safetensors header.
    ``base_model_sha256``: the base's model-file hash (jobs.digest.hash_dir), recorded in the verdict so a serving
    pod can check that it loads the base the adapter was trained on."""
    d = Path(adapter_dir)
    config = json.loads((d / "adapter_config.json").read_text())
    tensors = read_safetensors_header(d / "adapter_model.safetensors")
    verdict = check(config, tensors, max_lora_rank=max_lora_rank, base_vocab_size=base_vocab_size,
                    tokenizer_size=tokenizer_size, checked="adapter")
    verdict.base_model_sha256 = base_model_sha256
    return verdict


def base_model_name(uri: str) -> str:
    """What a published adapter names as its base (``base_model_name_or_path``): the base model's URI as the
    spec names it (``hf:org/name`` as the hub id ``org/name``), not the job-local folder PEFT loaded it from."""
    return uri[3:] if uri.startswith("hf:") else uri


def make_serving_ready(adapter_dir: str | Path, base_name: str) -> list[str]:
    """Leave exactly :data:`ADAPTER_FILES` in ``adapter_dir`` (KServe downloads everything under the adapter's
    prefix; PEFT also writes a README.md model card) and set ``base_model_name_or_path`` to ``base_name``.
    Returns the names removed. Only the config's one key changes: PEFT passes its own base to
    ``PeftModel.from_pretrained(base, dir)`` and never reads it."""
    import shutil

    d = Path(adapter_dir)
    missing = [f for f in ADAPTER_FILES if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{d} has no {', '.join(missing)}: PEFT did not save the adapter as safetensors")
    removed = []
    for p in sorted(d.iterdir()):
        if p.name not in ADAPTER_FILES:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p.name)
    cfg_path = d / "adapter_config.json"
    config = json.loads(cfg_path.read_text())
    config["base_model_name_or_path"] = base_name
    cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return removed


# ------------------------------------------------------------------------------ the spec

def spec_adapter_config(spec: TrainingRunSpec) -> dict[str, Any]:
    """The adapter_config.json a run of ``spec`` writes, as far as vLLM's check reads it (jobs/trainer/train.py's
    lora_config: bias none, no modules_to_save, the default init; the spec cannot express the others)."""
    lora = spec.lora
    return {"peft_type": "LORA", "r": lora.rank, "lora_alpha": lora.alpha, "target_modules": lora.target_modules,
            "use_dora": lora.use_dora, "use_rslora": lora.use_rslora, "bias": "none", "modules_to_save": None,
            "init_lora_weights": True}


#: a spec path for each kind of finding the spec can cause
_SPEC_PATHS = {"rank": "lora.rank", "dora": "lora.use_dora"}


def spec_advice(spec: TrainingRunSpec, lines: dict[FieldPath, int] | None = None) -> list[Problem]:
    """:func:`check` on the adapter the spec will produce, as advice (jobs.errors.Problem): what vLLM will
    refuse, and whether the merged model is then the way to serve it."""
    verdict = check(spec_adapter_config(spec), checked="spec")
    out: list[Problem] = []
    for p in verdict.problems:
        where = _SPEC_PATHS.get(p.kind, "lora")
        fix = p.fix
        if p.kind != "rank" and not spec.merge.enabled:
            fix = fix.replace("(merge.enabled: true publishes it)", "— set merge.enabled: true to publish one")
        prefix = "vLLM will not serve this adapter as a LoRA: " if p.kind != "rank" else "vLLM: "
        out.append(Problem(where, prefix + p.message, fix, line=(lines or {}).get(tuple(where.split(".")))))
    return out


# ------------------------------------------------------------------------------ the serving pod's download

def fetch(dest: str | Path, sources: dict[str, str], expected_sha256: dict[str, str] | None = None) -> None:
    """Download each ``{folder name: s3://…/prefix/}`` into ``dest/<folder name>`` (the init container of a
    rendered vLLM Deployment: ``python -m jobs.serving fetch``). Each URI must end with '/': S3 lists by plain
    prefix, so ``…/v1`` would also pull ``…/v10/*``. ``expected_sha256`` {folder name: hash}: the folder's model
    files must hash to it (jobs.digest.hash_dir, as the job hashed the base it trained on), else ValueError."""
    from jobs.digest import hash_dir
    from jobs.storage import download_prefix, open_store

    for name, uri in sources.items():
        if not uri.endswith("/"):
            raise ValueError(f"{uri} does not end with '/': S3 lists by prefix, so it would also match its "
                             "siblings (v1 matches v10); give the folder, ending with '/'")
        store, prefix = open_store(uri)
        download_prefix(store, prefix + "/", Path(dest) / name, workers=16)
    for name, want in (expected_sha256 or {}).items():
        got = hash_dir(Path(dest) / name)
        if got != want:
            raise ValueError(f"{sources.get(name, name)} changed since the adapter was trained: its model files hash "
                             f"to {got}, the version recorded {want}; serve the merged model, or train again on "
                             "this base")


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m jobs.serving")
    sub = parser.add_subparsers(dest="verb", required=True)
    f = sub.add_parser("fetch", help="download a served version's folders from S3 (a serving pod's init container)")
    f.add_argument("dest")
    f.add_argument("sources", nargs="+", metavar="NAME=URI/")
    f.add_argument("--sha256", action="append", default=[], metavar="NAME=HEX")
    args = parser.parse_args(argv)
    try:
        sources = dict(item.split("=", 1) for item in args.sources)
        fetch(args.dest, sources, dict(item.split("=", 1) for item in args.sha256))
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - a StorageError names bucket, key and the fix
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
