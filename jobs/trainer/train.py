"""Training: tokenise with the chat template, then a plain PyTorch loop over a PEFT model.

Our own loop rather than TRL's SFTTrainer so the hot path (packing, attention,
chunked loss — ``jobs.trainer.fastpath``) is ours to make fast, and so checkpoints,
resume and preemption are exact: a resumed run continues with the same batches
at the same optimizer step, none lost beyond the checkpoint interval, none
counted twice.

Here: tokenisation, the LoRA wrap, the schedule of a step's examples, validation, and
:func:`train`, which sets up the optimizer and resume and runs the step loop with its hooks
(``jobs.trainer.loop``; checkpoints: ``jobs.trainer.checkpoints``); how the work is spread over processes is
the strategy's (``jobs.trainer.strategies``).
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Callable

from jobs.errors import DataError, OutOfMemory, Problem, SpecError, is_gpu_out_of_memory
from jobs.spec import ALL_LINEAR, TrainingRunSpec

log = logging.getLogger("jobs")

IGNORE = -100


# ------------------------------------------------------------------------ tokenisation

def messages_for(row) -> list[dict]:
    """The prompt of a row as chat messages: its user turn, or a conversation up to its last answer."""
    if getattr(row, "turns", ()):
        last = max(i for i, (r, _) in enumerate(row.turns) if r == "assistant")
        return [{"role": r, "content": c} for r, c in row.turns[:last]]
    user = row.instruction if not row.input else f"{row.instruction}\n\n{row.input}"
    return [{"role": "user", "content": user}]


def _plain_turn(role: str, content: str) -> str:
    return {"system": "### System:\n", "user": "### Instruction:\n"}[role] + content + "\n\n"


def conversation_segments(tok, turns) -> list[tuple[str, bool]]:
    """A conversation as text segments in order, each marked trained (an assistant answer with
    the template's end-of-turn) or not (system, user, and the template's own scaffolding). Each
    answer is what the chat template adds between the prompt up to it (with the generation
    prompt) and the conversation through it; a template that rewrites earlier turns when a
    later one is added falls back to training only the last answer."""
    msgs = [{"role": r, "content": c} for r, c in turns]
    segs: list[tuple[str, bool]] = []
    if not getattr(tok, "chat_template", None):
        for m in msgs:
            if m["role"] == "assistant":
                segs += [("### Response:\n", False), (m["content"] + (tok.eos_token or "") + "\n\n", True)]
            else:
                segs.append((_plain_turn(m["role"], m["content"]), False))
        return segs
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs[:i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            last = max(j for j, x in enumerate(msgs) if x["role"] == "assistant")
            prompt = tok.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
            return [(prompt, False), (msgs[last]["content"] + (tok.eos_token or ""), True)]
        segs += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segs


def _encode_conversation(tok, row, max_len: int) -> dict | None:
    ids: list[int] = []
    labels: list[int] = []
    first_answer_at = None
    for text, trained in conversation_segments(tok, row.turns):
        piece = tok(text, add_special_tokens=False)["input_ids"]
        if not ids and tok.bos_token_id is not None and getattr(tok, "add_bos_token", False) and \
                (not piece or piece[0] != tok.bos_token_id):
            piece = [tok.bos_token_id] + piece
        if trained and first_answer_at is None:
            first_answer_at = len(ids)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    if first_answer_at is None or first_answer_at >= max_len - 4:
        return None  # not even the first answer fits
    if len(ids) > max_len:  # later turns cut: counted by encode_rows, named in the data report
        return {"input_ids": ids[:max_len], "labels": labels[:max_len], "cut": True}
    return {"input_ids": ids, "labels": labels}


def encode_example(tok, row, max_len: int) -> dict | None:
    """input_ids and labels for one row; loss only on the answer (every assistant turn of a
    conversation; system, user and template tokens masked). None if the prompt alone is too long."""
    if getattr(row, "turns", ()):
        return _encode_conversation(tok, row, max_len)
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
    if len(p) + len(a) > max_len:  # the answer's end is cut: counted by encode_rows, named in the data report
        a = a[: max_len - len(p)]
        return {"input_ids": p + a, "labels": [IGNORE] * len(p) + a, "cut": True}
    return {"input_ids": p + a, "labels": [IGNORE] * len(p) + a}


def prompt_text_for(tok, row_or_prompt) -> str:
    msgs = messages_for(row_or_prompt) if hasattr(row_or_prompt, "instruction") else \
        [{"role": "user", "content": str(row_or_prompt)}]
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return f"### Instruction:\n{msgs[0]['content']}\n\n### Response:\n"


def encode_rows(tok, rows, max_len: int, cut: list[int] | None = None) -> tuple[list[dict], list[int]]:
    """Every row encoded (:func:`encode_example`), and the lines of those whose prompt alone does not fit
    ``max_len``; the lines of rows kept with their answer cut at ``max_len`` go to ``cut`` when given."""
    out, too_long = [], []
    for r in rows:
        e = encode_example(tok, r, max_len)
        if e is None:
            too_long.append(r.line)
            continue
        if e.pop("cut", False) and cut is not None:
            cut.append(r.line)
        out.append(e)
    return out, too_long


# --------------------------------------------------------------------------- the model

def lora_config(spec: TrainingRunSpec):
    from peft import LoraConfig

    targets = "all-linear" if spec.lora.target_modules == ALL_LINEAR else list(spec.lora.target_modules)
    return LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                      target_modules=targets, use_rslora=spec.lora.use_rslora, use_dora=spec.lora.use_dora,
                      bias="none", task_type="CAUSAL_LM")


def wrap_lora(model, spec: TrainingRunSpec, start_from=None):
    """PEFT LoRA on the loaded base; the base stays frozen and in its own dtype.

    No ``prepare_model_for_kbit_training`` for QLoRA: it upcasts the norms and embeddings to fp32,
    so every activation after them is fp32 — twice the memory, and the bf16 varlen attention
    kernel no longer applies (an 8B QLoRA run then ran out of memory on a 139 GiB card). The
    4-bit base is frozen by PEFT either way; activation checkpointing is switched on by
    ``fastpath.prepare_model`` from the plan.
    """
    from peft import get_peft_model

    try:
        wrapped = get_peft_model(model, lora_config(spec))
    except ValueError as err:  # e.g. target modules not found in the model
        raise DataError(f"LoRA could not be applied: {err}",
                        hint="check lora.target_modules against the model's module names") from None
    if start_from is not None:
        load_adapter_weights(wrapped, start_from, spec)
    return wrapped


def load_adapter_weights(model, adapter_dir, spec: TrainingRunSpec) -> None:
    """``spec.base_adapter``'s weights (``adapter_dir``: its adapter_model.safetensors, never a pickle) into the
    new adapter of ``model``, which must hold exactly its tensors at their shapes. A model built on the meta device
    (every rank of an FSDP2 run but the one that loads the base) holds no values: rank 0's copy gets the weights
    and broadcasts them (``distributed.load_sharded``)."""
    from pathlib import Path

    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    if any(p.is_meta for p in model.parameters()):
        return
    theirs = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    ours = get_peft_model_state_dict(model)
    missing = sorted(set(ours) - set(theirs))
    extra = sorted(set(theirs) - set(ours))
    shapes = sorted(k for k in set(ours) & set(theirs) if tuple(ours[k].shape) != tuple(theirs[k].shape))
    if missing or extra or shapes:
        def first(keys: list[str]) -> str:
            return ", ".join(k.removeprefix("base_model.model.") for k in keys[:3]) + (" …" if len(keys) > 3 else "")

        what = "; ".join(x for x in (f"{len(missing)} tensors it lacks ({first(missing)})" if missing else "",
                                     f"{len(extra)} tensors this run's adapter has no place for ({first(extra)})"
                                     if extra else "",
                                     f"{len(shapes)} of another shape ({first(shapes)})" if shapes else "") if x)
        raise SpecError([Problem("lora.target_modules", f"this run's adapter and the base_adapter's differ: {what}",
                                 "set lora.target_modules (and rank) to the base_adapter's own, as its "
                                 "adapter_config.json lists them", line=spec.line_of("lora.target_modules"))])
    set_peft_model_state_dict(model, theirs)
    log.info("base_adapter: %d tensors loaded into the adapter; training starts from them", len(theirs))


# ---------------------------------------------------------------------------- the loop

@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "lr", "tokens", "examples"}
    evals: list[dict] = field(default_factory=list)  # {"step", "val_loss"}
    best_val: float | None = None
    best_step: int | None = None  # the step whose adapter had best_val
    bad_evals: int = 0
    patience_ref: float | None = None  # the validation loss early stopping measures improvement against
    stopped_early: bool = False
    tokens_seen: int = 0
    examples_seen: int = 0
    tokens_per_micro_batch: int | None = None  # after any out-of-memory back-off
    oom_backoffs: list[dict] = field(default_factory=list)  # {"step", "from", "to"}
    world_size: int | None = None  # training processes that wrote the checkpoint (None: written before)
    examples_per_step: int | None = None  # what a step meant when the checkpoint was written


@dataclass
class TrainResult:
    state: TrainState
    total_steps: int
    resumed_from: int | None
    plan_notes: list[str]
    seconds: float
    tokens_per_second: float  # every step of this run, warm-up (compilation) included
    tokens_per_second_steady: float | None  # after the warm-up steps
    examples_per_step: int
    tokens_per_step: float  # mean over this run's steps
    val_loss: float | None  # of the adapter the model now holds (the best one)
    published_step: int  # the step that adapter comes from
    loss_scaling: bool
    first_step_seconds: float | None = None  # this run's first optimizer step, compilation included
    adapter: dict | None = None  # FSDP2 runs: the whole adapter to publish (CPU tensors; the model is sharded)
    val_losses: list[float] | None = None  # val_loss per example, in val_ex's order (None: measured before a resume)


def _target_tokens(mb: dict) -> int:
    # labels are shifted by one inside the loss: a target at position 0 of an example never counts
    n = 0
    pos = 0
    for length in mb["seq_lens"]:
        n += sum(1 for t in mb["labels"][pos + 1: pos + length] if t != IGNORE)
        pos += length
    return n


class Schedule:
    """Which examples make up optimizer step k: a pure function of (seed, epoch, rank).

    A step is ``examples_per_step`` examples (the guide's batch, 4-16), whatever their length;
    each epoch is a fresh shuffle of all examples cut into such groups (the last may be smaller).
    With several ranks, each takes every world-th example of the group. How a rank's examples are
    laid into micro-batches is decided per step by the caller's token budget (``micro_batches``),
    so an out-of-memory back-off changes the layout, never the examples a step sees.
    """

    def __init__(self, examples: list[dict], examples_per_step: int, seed: int, epochs: int, *,
                 rank: int = 0, world_size: int = 1):
        if examples_per_step < 1:
            raise ValueError("examples_per_step must be at least 1")
        self.examples, self.examples_per_step, self.seed, self.epochs = examples, examples_per_step, seed, epochs
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = max(1, math.ceil(len(examples) / examples_per_step))
        self._order: tuple[int, list[int]] | None = None

    def _epoch_order(self, e: int) -> list[int]:
        if self._order is None or self._order[0] != e:
            order = list(range(len(self.examples)))
            random.Random(self.seed + e).shuffle(order)
            self._order = (e, order)
        return self._order[1]

    def step_indices(self, k: int) -> list[int]:
        """Indices of every example of step k (all ranks)."""
        e, i = divmod(k, self.steps_per_epoch)
        return self._epoch_order(e)[i * self.examples_per_step:(i + 1) * self.examples_per_step]

    def rank_examples(self, k: int) -> list[dict]:
        return [self.examples[j] for j in self.step_indices(k)[self.rank::self.world_size]]

    def micro_batches(self, k: int, tokens_per_mb: int, pack_step: Callable) -> list[dict]:
        return pack_step(self.rank_examples(k), tokens_per_mb)


class TokenBudget:
    """Tokens per micro-batch, halved on CUDA out-of-memory down to the longest example."""

    def __init__(self, tokens: int, floor: int):
        self.tokens, self.floor = int(tokens), int(floor)

    def halve(self) -> bool:
        new = max(self.floor, (self.tokens // 2 // 64) * 64)
        if new >= self.tokens:
            return False
        self.tokens = new
        return True


def free_memory() -> None:
    """Drop what Python still holds and give the cached GPU memory back (between stages, after an OOM)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Losses:
    """One validation: ``mean``, the token-weighted mean loss over every example (every rank's share), and
    ``mine``, the token-weighted mean loss of each example of this rank's share (``strategy.validation_batches``),
    in its order; ``strategy.gather_per_example`` puts every rank's together in the examples' order."""

    mean: float
    mine: list[float]


def evaluate_loss(model, examples: list[dict], budget: TokenBudget | int, strategy) -> Losses | None:
    """Cross-entropy over examples (no dropout, no grad), overall and per example; backs off on out-of-memory.

    With several ranks each takes its share of the examples (``strategy.validation_batches``: packed in order, each
    forward's per-example losses from ``fastpath.example_losses``) and the sums are all-reduced, so every rank gets
    the same mean (early stopping decides the same everywhere); the per-example losses stay on their rank."""
    import torch

    from jobs.trainer import fastpath

    if not examples:
        return None
    if not isinstance(budget, TokenBudget):
        budget = TokenBudget(budget, max(len(e["input_ids"]) for e in examples))
    device = strategy.device
    was_training = model.training
    model.eval()
    try:
        while True:
            try:
                with torch.no_grad():
                    mbs, counted = strategy.validation_batches(examples, budget.tokens)
                    # each example's loss sum and target tokens, read back once at the end (no sync a forward)
                    sums, counts = [], []
                    for i, mb in enumerate(mbs):
                        loss_sums, ntok = fastpath.example_losses(model, fastpath.to_device(mb, device))
                        if i < counted:
                            sums.append(loss_sums.double())
                            counts += ntok
                    per = torch.stack([torch.cat(sums) if sums else torch.zeros(0, dtype=torch.float64,
                                                                                 device=device),
                                       torch.tensor(counts, dtype=torch.float64, device=device)], 1)
                totals = per.sum(0)
                strategy.reduce_sum(totals)
                mine = per.cpu().tolist()
                return Losses(float(totals[0]) / max(1.0, float(totals[1])), [s / max(1.0, n) for s, n in mine])
            except RuntimeError as err:
                if not is_gpu_out_of_memory(err):
                    raise
                msg = str(err).splitlines()[0]
                strategy.validation_oom(budget.tokens, msg)
            free_memory()
            before = budget.tokens
            if not budget.halve():
                raise OutOfMemory(f"validation ran out of GPU memory at {before} tokens per micro-batch ({msg})",
                                  hint="lower training.max_seq_length, use quantization.mode: 4bit, or a larger GPU")
            log.warning("out of GPU memory during validation at %d tokens per micro-batch: retrying at %d",
                        before, budget.tokens)
    finally:
        if was_training:
            model.train()


def _filler(examples: list[dict], tokens: int) -> dict:  # validation's (SFT examples)
    """A micro-batch whose loss counts for nothing: what a sharded rank runs when it has fewer micro-batches
    than another (every forward and backward of FSDP2 is a collective over all ranks)."""
    from jobs.trainer import fastpath

    return fastpath.pack_rows(examples[:1], tokens, seed=0, shuffle=False)[0]


def _check_resumable(saved: TrainState, step: int, examples_per_step: int, world_size: int, checkpoints) -> None:
    """A checkpoint resumes on any number of processes as long as a step still means the same examples
    (the default: 16 per step on any world size). With an explicit accumulation a step is
    per-device batch x accumulation x world size, so another world size would train other batches
    under the saved optimizer and schedule: refused, with what would make it resume."""
    if saved.examples_per_step in (None, examples_per_step):
        return
    raise SpecError([Problem(
        "training.gradient_accumulation_steps",
        f"the checkpoint at step {step} ({checkpoints.location}) was written by {saved.world_size} training "
        f"process(es) with {saved.examples_per_step} examples per optimizer step; on {world_size} this spec "
        f"makes {examples_per_step}, so its steps would be other batches",
        f"set it to 'auto' (16 examples per step on any world size) or to a value that makes "
        f"{saved.examples_per_step} examples per step on {world_size} process(es); or delete "
        f"{checkpoints.location} to start the run afresh")])


def _optimizer(params, t, cuda: bool):
    import torch

    if t.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW8bit(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    # the same AdamW; on a GPU its fused kernel (one launch for all LoRA tensors, no host sync)
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=True if cuda else None)


def _resume(checkpoints, model, optimizer, scheduler, state: TrainState, scaler, budget: TokenBudget, *,
            total_steps: int, examples_per_step: int, world_size: int) -> int | None:
    """Restore the newest checkpoint into the model, optimizer, schedule, scaler and ``state``; the step it was
    written at (None: none). A back-off it recorded keeps the micro-batches as small."""
    resumed_from = checkpoints.restore(model, optimizer, scheduler, state, scaler)
    if resumed_from is None:
        return None
    _check_resumable(state, resumed_from, examples_per_step, world_size, checkpoints)
    written_by = state.world_size or 1
    log.info("resumed from checkpoint at step %d of %d%s", resumed_from, total_steps,
             f" (written by {written_by} training process{'es' if written_by > 1 else ''}, now {world_size})"
             if written_by != world_size else "")
    state.world_size = world_size
    if state.tokens_per_micro_batch:
        budget.tokens = min(budget.tokens, state.tokens_per_micro_batch)
    return resumed_from


def train(model, spec: TrainingRunSpec, train_ex: list[dict], val_ex: list[dict], *, strategy, plan,
          checkpoints, stop_requested: Callable[[], bool] = lambda: False,
          on_progress: Callable[..., None] | None = None, compile_cache=None, objective=None) -> TrainResult:
    """Train ``model`` (already PEFT-wrapped) in place, spread over the training processes by ``strategy``
    (``jobs.trainer.strategies``). ``checkpoints`` saves and restores state. ``objective``
    (``jobs.trainer.preference.Objective``; None: SFT) is what a step minimises: SFT over encoded examples, or DPO /
    ORPO over encoded pairs (``preference.encode_pairs``), whose validation is the held-out preference loss.
    ``on_progress(**fields)`` sees every recorded step and validation (jobs.progress.ProgressWriter.update).
    ``compile_cache`` (a :class:`jobs.trainer.compile_cache.CompileCache`) is saved once the first step has
    compiled, so a retry that comes before the end of training starts warm too.

    When it returns, the model holds the adapter with the best validation loss seen (the last one
    when there is no validation data), and ``TrainResult.published_step`` says which step that is.
    """
    import torch
    from transformers import get_scheduler

    from jobs.trainer.loop import Checkpointing, CompileCacheSave, EarlyStopping, ProgressLog, StepLoop, Validation

    from jobs.trainer.preference import Objective

    objective = objective if objective is not None else Objective("sft")
    world_size, t, cuda = strategy.world.size, spec.training, strategy.device.type == "cuda"
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    examples_per_step = t.examples_per_step(world_size)
    sched = Schedule(train_ex, examples_per_step, t.seed, t.epochs, rank=strategy.world.rank, world_size=world_size)
    total_steps = sched.steps_per_epoch * t.epochs
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    eval_every = t.eval_interval_for(sched.steps_per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, t, cuda)
    warmup = t.warmup_steps_for(total_steps)
    scheduler = get_scheduler(t.lr_scheduler if t.lr_scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    # fp16 has 5 exponent bits: small LoRA gradients underflow without loss scaling. bf16 and fp32 need none.
    scaling = cuda and plan.dtype == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=scaling)

    state = TrainState(world_size=world_size, examples_per_step=examples_per_step)
    longest = max((objective.length(e) for e in train_ex), default=2)
    budget = TokenBudget(plan.tokens_per_micro_batch, min(longest, plan.tokens_per_micro_batch))
    objective.prepare(model, train_ex, val_ex, budget.tokens, strategy)
    resumed_from = _resume(checkpoints, model, optimizer, scheduler, state, scaler, budget, total_steps=total_steps,
                           examples_per_step=examples_per_step, world_size=world_size)
    unit = f"{objective.method.upper()} pairs" if objective.preference else "examples"
    log.info("training: %d %s, %d per optimizer step (%d per device x %d accumulation x %d "
             "device%s), packed into micro-batches of <=%d tokens; %d optimizer steps (%d per epoch), warm-up %d, "
             "validation every %d steps; lr %.1e, LoRA r=%d alpha=%d%s%s", len(train_ex), unit, examples_per_step,
             t.per_device_batch_size, t.accumulation_for(world_size), world_size, "s" if world_size > 1 else "",
             budget.tokens, total_steps, sched.steps_per_epoch, warmup, eval_every, t.learning_rate,
             spec.lora.rank, spec.lora.alpha, ", fp16 loss scaling" if scaling else "",
             f", beta {objective.beta:g}" if objective.preference else "")

    loop = StepLoop(model, strategy, sched=sched, budget=budget, optimizer=optimizer, scheduler=scheduler,
                    scaler=scaler, params=params, state=state, total_steps=total_steps,
                    eval_every=eval_every if val_ex else None, checkpoint_every=t.checkpoint_interval_steps,
                    longest=longest, examples_per_step=examples_per_step, stop_requested=stop_requested,
                    objective=objective)
    progress = ProgressLog(t.logging_interval_steps, sched.steps_per_epoch, on_progress, cuda)
    validation = Validation(val_ex, on_progress, checkpoints.restored_best if resumed_from is not None else None)
    hooks = [progress, validation, EarlyStopping(t.early_stopping_patience), Checkpointing(checkpoints, validation)]
    loop.run(hooks + ([CompileCacheSave(compile_cache)] if compile_cache is not None else []))
    progress.flush(loop)
    seconds = loop.clock.stop(strategy.device)
    # The adapter to publish: the one with the best validation loss (early stopping's point).
    val_loss, val_losses, published_step, adapter = validation.publish(loop)
    clock = loop.clock
    return TrainResult(state=state, total_steps=total_steps, resumed_from=resumed_from, plan_notes=plan.notes,
                       seconds=seconds, tokens_per_second=clock.tokens_this_run / max(seconds, 1e-9),
                       tokens_per_second_steady=clock.steady_tokens_per_second(), examples_per_step=examples_per_step,
                       tokens_per_step=sum(clock.step_tokens) / max(1, len(clock.step_tokens)), val_loss=val_loss,
                       val_losses=val_losses,
                       published_step=published_step, loss_scaling=scaling,
                       first_step_seconds=round(clock.step_times[0], 1) if clock.step_times else None,
                       adapter=adapter)
