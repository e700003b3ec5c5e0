"""Checkpoints in object storage: the adapter, the optimizer, the schedule, the RNGs and the loop's state.

Everything is safetensors or JSON: a checkpoint comes from a bucket, and anything that can write there must
not be able to run code in the next pod (no pickle, no ``torch.load``). A sharded run writes and reads the
same whole files as an unsharded one (``jobs.trainer.distributed``: gathered by the strategy, cut on restore).
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.errors import DataError

if TYPE_CHECKING:
    from jobs.trainer.train import TrainState

log = logging.getLogger("jobs")


def _optimizer_to_safetensors(sd: dict) -> tuple[dict, dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON (everything else)."""
    import torch

    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        entry = {}
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = v.detach().contiguous().cpu()
                entry[name] = {"tensor": f"state.{pid}.{name}"}
            else:
                entry[name] = {"value": v}
        meta["state"][str(pid)] = entry
    return tensors, meta


def _optimizer_from_safetensors(tensors: dict, meta: dict) -> dict:
    state = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {name: tensors[v["tensor"]] if "tensor" in v else v["value"] for name, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


class Checkpoints:
    """Checkpoints in object storage under <output>/<name>/checkpoints/<training_hash>/step-NNNNNN/.

    Everything is safetensors or JSON: a checkpoint comes from a bucket, and anything that can
    write there must not be able to run code in the next pod (no pickle, no ``torch.load``).
    A checkpoint counts only once its ``_COMPLETE`` marker exists; the two newest are kept in the
    bucket, only the newest on local disk.
    """

    def __init__(self, store, prefix: str, workdir: Path, keep: int = 2, *, earlier_prefix: str | None = None):
        self.store, self.prefix, self.workdir, self.keep = store, prefix.strip("/"), Path(workdir), keep
        # where checkpoints of this run were kept before (by the whole spec's hash): read, never written
        self.earlier_prefix = earlier_prefix.strip("/") if earlier_prefix and earlier_prefix != prefix else None
        self.restored_best: dict | None = None
        self.location = f"{store.label}/{self.prefix}"

    def _steps(self, prefix: str | None = None) -> list[int]:
        from jobs.storage import join

        prefix = prefix or self.prefix
        steps = []
        for d in self.store.list_dirs(prefix):
            if d.startswith("step-") and d[5:].isdigit() and self.store.exists(join(prefix, d, "_COMPLETE")):
                steps.append(int(d[5:]))
        return sorted(steps)

    def save(self, model, optimizer, scheduler, state: TrainState, scaler=None, best_adapter=None, *,
             adapter: dict | None = None, optimizer_state: dict | None = None) -> None:
        """Write a checkpoint. ``adapter`` / ``optimizer_state``: the whole state, already gathered from an
        FSDP2-sharded model (default: read from ``model`` and ``optimizer``)."""
        import shutil

        import torch
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        from jobs.storage import join, upload_dir

        name = f"step-{state.step:06d}"
        root = self.workdir / "checkpoints"
        local = root / name
        local.mkdir(parents=True, exist_ok=True)
        adapter = get_peft_model_state_dict(model) if adapter is None else adapter
        save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()}, str(local / "adapter.safetensors"))
        if best_adapter is not None:
            save_file({k: v.contiguous() for k, v in best_adapter.items()}, str(local / "best_adapter.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_safetensors(optimizer.state_dict() if optimizer_state is None
                                                          else optimizer_state)
        opt_tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            opt_tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(opt_tensors, str(local / "optimizer.safetensors"))
        py_rng = random.getstate()
        extra = {"optimizer": opt_meta, "scheduler": scheduler.state_dict(),
                 "py_rng": [py_rng[0], list(py_rng[1]), py_rng[2]],
                 "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
        (local / "trainer_state.json").write_text(json.dumps(extra))
        (local / "state.json").write_text(json.dumps(state.__dict__))
        upload_dir(self.store, local, join(self.prefix, name))
        self.store.put_bytes(join(self.prefix, name, "_COMPLETE"), b"ok\n")
        log.info("checkpoint saved at step %d to %s/%s", state.step, self.store.label, join(self.prefix, name))
        for old in root.iterdir():  # the bucket holds the history; the scratch disk keeps only the newest
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        for old in self._steps()[:-self.keep]:
            self._delete(old)

    def _delete(self, step: int) -> None:
        from jobs.storage import join

        prefix = join(self.prefix, f"step-{step:06d}")
        objs = self.store.list(prefix + "/")
        # the marker goes first, so a half-deleted checkpoint never looks complete
        marker = join(prefix, "_COMPLETE")
        for o in sorted(objs, key=lambda o: o.key != marker):
            delete = getattr(self.store, "delete", None)
            if delete:
                delete(o.key)

    def restore(self, model, optimizer, scheduler, state: TrainState, scaler=None) -> int | None:
        import shutil

        import torch
        from peft import set_peft_model_state_dict
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from jobs.storage import download_prefix, join

        prefix = self.prefix
        steps = self._steps()
        if not steps and self.earlier_prefix:
            prefix, steps = self.earlier_prefix, self._steps(self.earlier_prefix)
        if not steps:
            return None
        step = steps[-1]
        name = f"step-{step:06d}"
        local = self.workdir / "restore" / name
        download_prefix(self.store, join(prefix, name) + "/", local)
        where = f"{self.store.label}/{join(prefix, name)}"
        self.location = f"{self.store.label}/{prefix}"
        if not (local / "adapter.safetensors").is_file():
            raise DataError(f"checkpoint {where} has no adapter.safetensors (written by an older version, or "
                            "tampered with); checkpoints are only read as safetensors and JSON",
                            hint="delete that checkpoint folder to start the run afresh")
        from jobs.trainer.distributed import is_sharded, shard_like, shard_optimizer_state

        sharded = is_sharded(model)
        try:
            adapter = load_file(str(local / "adapter.safetensors"))
            if sharded:  # the whole adapter as every run writes it, cut into this rank's shards
                from peft import get_peft_model_state_dict

                mine = get_peft_model_state_dict(model)
                adapter = {k: shard_like(mine[k], v) if k in mine else v for k, v in adapter.items()}
            set_peft_model_state_dict(model, adapter)
            opt = load_file(str(local / "optimizer.safetensors"))
            best = local / "best_adapter.safetensors"
            self.restored_best = load_file(str(best)) if best.is_file() else None
            extra = json.loads((local / "trainer_state.json").read_text())
            saved = json.loads((local / "state.json").read_text())
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            raise DataError(f"checkpoint {where} could not be read: {err}",
                            hint="delete that checkpoint folder to start the run afresh") from None
        opt_state = _optimizer_from_safetensors(opt, extra["optimizer"])
        optimizer.load_state_dict(shard_optimizer_state(optimizer, opt_state) if sharded else opt_state)
        scheduler.load_state_dict(extra["scheduler"])
        if scaler is not None and extra.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(extra["scaler"])
        torch.set_rng_state(opt["rng.cpu"])
        if "rng.cuda" in opt and torch.cuda.is_available():
            torch.cuda.set_rng_state(opt["rng.cuda"])
        v, internal, gauss = extra["py_rng"]
        random.setstate((v, tuple(internal), gauss))
        for k, v in saved.items():
            if hasattr(state, k):
                setattr(state, k, v)
        shutil.rmtree(local, ignore_errors=True)
        return step
