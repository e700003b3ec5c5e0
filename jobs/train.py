"""Training: tokenise with the chat template, then a plain PyTorch loop over a PEFT model.

Our own loop rather than TRL's SFTTrainer so the hot path (packing, attention,
chunked loss — ``jobs.fastpath``) is ours to make fast, and so checkpoints,
resume and preemption are exact: a resumed run continues with the same batches
at the same optimizer step, none lost beyond the checkpoint interval, none
counted twice.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from jobs.errors import DataError, Preempted
from jobs.spec import ALL_LINEAR, TrainingRunSpec

log = logging.getLogger("jobs")

IGNORE = -100


# ------------------------------------------------------------------------ tokenisation

def messages_for(row) -> list[dict]:
    user = row.instruction if not row.input else f"{row.instruction}\n\n{row.input}"
    return [{"role": "user", "content": user}]


def encode_example(tok, row, max_len: int) -> dict | None:
    """input_ids and labels for one row; loss only on the answer. None if the prompt alone is too long."""
    prompt_msgs = messages_for(row)
    full_msgs = prompt_msgs + [{"role": "assistant", "content": row.output}]
    if getattr(tok, "chat_template", None):
        prompt_text = tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        full_text = tok.apply_chat_template(full_msgs, tokenize=False)
        if full_text.startswith(prompt_text):
            answer_text = full_text[len(prompt_text):]
        else:  # a template that rewrites earlier turns: fall back to answer + EOS
            answer_text = row.output + (tok.eos_token or "")
    else:
        prompt_text = f"### Instruction:\n{prompt_msgs[0]['content']}\n\n### Response:\n"
        answer_text = row.output + (tok.eos_token or "")
    p = tok(prompt_text, add_special_tokens=False)["input_ids"]
    a = tok(answer_text, add_special_tokens=False)["input_ids"]
    if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False) and (not p or p[0] != tok.bos_token_id):
        p = [tok.bos_token_id] + p
    if len(p) >= max_len - 4:
        return None
    a = a[: max_len - len(p)]
    return {"input_ids": p + a, "labels": [IGNORE] * len(p) + a}


def prompt_text_for(tok, row_or_prompt) -> str:
    msgs = messages_for(row_or_prompt) if hasattr(row_or_prompt, "instruction") else \
        [{"role": "user", "content": str(row_or_prompt)}]
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return f"### Instruction:\n{msgs[0]['content']}\n\n### Response:\n"


def encode_rows(tok, rows, max_len: int) -> tuple[list[dict], list[int]]:
    out, too_long = [], []
    for r in rows:
        e = encode_example(tok, r, max_len)
        if e is None:
            too_long.append(r.line)
        else:
            out.append(e)
    return out, too_long


# --------------------------------------------------------------------------- the model

def lora_config(spec: TrainingRunSpec):
    from peft import LoraConfig

    targets = "all-linear" if spec.lora.target_modules == ALL_LINEAR else list(spec.lora.target_modules)
    return LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                      target_modules=targets, use_rslora=spec.lora.use_rslora, use_dora=spec.lora.use_dora,
                      bias="none", task_type="CAUSAL_LM")


def wrap_lora(model, spec: TrainingRunSpec, *, gradient_checkpointing: bool):
    from peft import get_peft_model, prepare_model_for_kbit_training

    # Activation checkpointing itself is switched on by fastpath.prepare_model, from the plan.
    if spec.quantization.mode != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        return get_peft_model(model, lora_config(spec))
    except ValueError as err:  # e.g. target modules not found in the model
        raise DataError(f"LoRA could not be applied: {err}",
                        hint="check lora.target_modules against the model's module names") from None


# ---------------------------------------------------------------------------- the loop

@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "lr", "tokens"}
    evals: list[dict] = field(default_factory=list)  # {"step", "val_loss"}
    best_val: float | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    tokens_seen: int = 0


@dataclass
class TrainResult:
    state: TrainState
    total_steps: int
    resumed_from: int | None
    plan_notes: list[str]
    seconds: float
    tokens_per_second: float


def _target_tokens(mb: dict) -> int:
    # labels are shifted by one inside the loss: a target at position 0 of an example never counts
    n = 0
    pos = 0
    for length in mb["seq_lens"]:
        n += sum(1 for t in mb["labels"][pos + 1: pos + length] if t != IGNORE)
        pos += length
    return n


class Schedule:
    """Which micro-batches make up optimizer step k: a pure function of (seed, epoch)."""

    def __init__(self, examples: list[dict], tokens_per_mb: int, seed: int, epochs: int, accumulation: int,
                 pack_rows: Callable):
        self.examples, self.tokens_per_mb, self.seed = examples, tokens_per_mb, seed
        self.accumulation, self.pack_rows = accumulation, pack_rows
        self._cache: dict[int, list[dict]] = {}
        self.per_epoch = len(self.epoch(0))
        self.steps_per_epoch = max(1, math.ceil(self.per_epoch / accumulation))
        self.epochs = epochs

    def epoch(self, e: int) -> list[dict]:
        if e not in self._cache:
            self._cache = {e: self.pack_rows(self.examples, self.tokens_per_mb, seed=self.seed + e, shuffle=True)}
        return self._cache[e]

    def step(self, k: int) -> list[dict]:
        e, i = divmod(k, self.steps_per_epoch)
        mbs = self.epoch(e)
        return mbs[i * self.accumulation:(i + 1) * self.accumulation]


def evaluate_loss(model, examples: list[dict], tokens_per_mb: int, device) -> float | None:
    """Mean token cross-entropy over examples (no dropout, no grad)."""
    import torch

    from jobs import fastpath

    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for mb in fastpath.pack_rows(examples, tokens_per_mb, seed=0, shuffle=False):
            loss_sum, ntok = fastpath.lm_loss(model, fastpath.to_device(mb, device))
            total += float(loss_sum)
            n += ntok
    if was_training:
        model.train()
    return total / max(1, n)


def train(model, spec: TrainingRunSpec, train_ex: list[dict], val_ex: list[dict], *, device, plan,
          checkpoints, stop_requested: Callable[[], bool] = lambda: False) -> TrainResult:
    """Train ``model`` (already PEFT-wrapped) in place. ``checkpoints`` saves and restores state."""
    import torch
    from transformers import get_scheduler

    from jobs import fastpath

    t = spec.training
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    accumulation = t.accumulation_for(1)
    sched = Schedule(train_ex, plan.tokens_per_micro_batch, t.seed, t.epochs, accumulation, fastpath.pack_rows)
    total_steps = sched.steps_per_epoch * t.epochs
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda" and t.optimizer == "adamw_torch_fused"
    if t.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb
        optimizer = bnb.optim.PagedAdamW8bit(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=fused or None)
    warmup = int(round(t.warmup_ratio * total_steps))
    scheduler = get_scheduler(t.lr_scheduler if t.lr_scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    state = TrainState()
    resumed_from = checkpoints.restore(model, optimizer, scheduler, state)
    if resumed_from is not None:
        log.info("resumed from checkpoint at step %d of %d", resumed_from, total_steps)
    log.info("training: %d examples, %d micro-batches/epoch of <=%d tokens, accumulation %d, %d optimizer steps, "
             "lr %.1e, LoRA r=%d alpha=%d", len(train_ex), sched.per_epoch, plan.tokens_per_micro_batch,
             accumulation, total_steps, t.learning_rate, spec.lora.rank, spec.lora.alpha)
    model.train()
    t0 = time.perf_counter()
    tokens_this_run = 0
    steps_this_run = 0
    while state.step < total_steps and not state.stopped_early:
        step_t0 = time.perf_counter()
        mbs = sched.step(state.step)
        n_target = sum(_target_tokens(mb) for mb in mbs) or 1
        step_loss = 0.0
        for mb in mbs:
            batch = fastpath.to_device(mb, device)
            loss_sum, _ = fastpath.lm_loss(model, batch)
            (loss_sum / n_target).backward()
            step_loss += float(loss_sum.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        steps_this_run += 1
        real_tokens = sum(len(mb["input_ids"]) for mb in mbs)
        tokens_this_run += real_tokens
        state.tokens_seen += real_tokens
        loss = step_loss / n_target
        if not math.isfinite(loss):
            raise DataError(f"the training loss became {loss} at step {state.step}",
                            hint="lower training.learning_rate, or check the data for empty or garbled outputs")
        state.history.append({"step": state.step, "loss": round(loss, 5), "lr": scheduler.get_last_lr()[0],
                              "tokens": real_tokens})
        if state.step % t.logging_interval_steps == 0 or state.step == total_steps:
            elapsed = time.perf_counter() - t0
            tps = tokens_this_run / max(elapsed, 1e-9)
            eta = (total_steps - state.step) * elapsed / max(1, steps_this_run)
            log.info("step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  step %.2fs  ETA %s", state.step, total_steps,
                     loss, scheduler.get_last_lr()[0], tps, time.perf_counter() - step_t0, _fmt_eta(eta))
        if val_ex and (state.step % t.eval_interval_steps == 0) and state.step < total_steps:
            _eval_and_maybe_stop(model, val_ex, plan, device, state, t.early_stopping_patience)
        if state.step % t.checkpoint_interval_steps == 0 and state.step < total_steps:
            checkpoints.save(model, optimizer, scheduler, state)
        if stop_requested():
            checkpoints.save(model, optimizer, scheduler, state)
            raise Preempted(f"stopped by SIGTERM at step {state.step}/{total_steps}; checkpoint saved",
                            hint="the Job retries and resumes from this checkpoint")
    seconds = time.perf_counter() - t0
    return TrainResult(state=state, total_steps=total_steps, resumed_from=resumed_from, plan_notes=plan.notes,
                       seconds=seconds, tokens_per_second=tokens_this_run / max(seconds, 1e-9))


def _eval_and_maybe_stop(model, val_ex, plan, device, state: TrainState, patience: int | None) -> None:
    val = evaluate_loss(model, val_ex, plan.tokens_per_micro_batch, device)
    state.evals.append({"step": state.step, "val_loss": round(val, 5)})
    log.info("step %d  validation loss %.4f", state.step, val)
    if state.best_val is None or val < state.best_val - 1e-4:
        state.best_val, state.bad_evals = val, 0
    else:
        state.bad_evals += 1
        if patience and state.bad_evals >= patience:
            log.info("early stopping: validation loss has not improved for %d evaluations", patience)
            state.stopped_early = True


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ------------------------------------------------------------------------- checkpoints

class Checkpoints:
    """Checkpoints in object storage under <output>/<name>/checkpoints/<spec_hash>/step-NNNNNN/.

    A checkpoint counts only once its ``_COMPLETE`` marker exists; the two newest are kept.
    """

    def __init__(self, store, prefix: str, workdir: Path, keep: int = 2):
        self.store, self.prefix, self.workdir, self.keep = store, prefix.strip("/"), Path(workdir), keep

    def _steps(self) -> list[int]:
        from jobs.storage import join

        steps = []
        for d in self.store.list_dirs(self.prefix):
            if d.startswith("step-") and d[5:].isdigit() and self.store.exists(join(self.prefix, d, "_COMPLETE")):
                steps.append(int(d[5:]))
        return sorted(steps)

    def save(self, model, optimizer, scheduler, state: TrainState) -> None:
        import torch
        from peft import get_peft_model_state_dict

        from jobs.storage import join, upload_dir

        name = f"step-{state.step:06d}"
        local = self.workdir / "checkpoints" / name
        local.mkdir(parents=True, exist_ok=True)
        torch.save(get_peft_model_state_dict(model), local / "adapter.pt")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(), "py_rng": random.getstate()}, local / "optim.pt")
        (local / "state.json").write_text(json.dumps(state.__dict__))
        upload_dir(self.store, local, join(self.prefix, name))
        self.store.put_bytes(join(self.prefix, name, "_COMPLETE"), b"ok\n")
        log.info("checkpoint saved at step %d to %s/%s", state.step, self.store.label, join(self.prefix, name))
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

    def restore(self, model, optimizer, scheduler, state: TrainState) -> int | None:
        import torch
        from peft import set_peft_model_state_dict

        from jobs.storage import download_prefix, join

        steps = self._steps()
        if not steps:
            return None
        step = steps[-1]
        name = f"step-{step:06d}"
        local = self.workdir / "restore" / name
        download_prefix(self.store, join(self.prefix, name) + "/", local)
        set_peft_model_state_dict(model, torch.load(local / "adapter.pt", map_location="cpu", weights_only=True))
        extra = torch.load(local / "optim.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["rng"])
        random.setstate(extra["py_rng"])
        saved = json.loads((local / "state.json").read_text())
        for k, v in saved.items():
            setattr(state, k, v)
        return step
