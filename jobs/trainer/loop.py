"""The step loop: one optimizer step after another, then the hooks (log and progress, validation, early
stopping, checkpoints, the compile cache), each a small class of its own.

The GPU is never waited for in the loop itself: a step's loss goes to pinned memory behind a CUDA event and
is read (:class:`ProgressLog`) once the next step is queued, or at once where a hook is about to pause the
GPU anyway (a validation, a checkpoint, a stop, the last step; and every step on a CPU). How the work is
spread over the training processes is the strategy's (``jobs.trainer.strategies``).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from jobs.errors import Diverged, Preempted

log = logging.getLogger("jobs")


@dataclass
class StepEnd:
    """What happens at the end of optimizer step ``step`` (1-based): decided once, read by every hook."""

    step: int
    due_eval: bool
    due_checkpoint: bool
    stop: bool  # SIGTERM on any rank: checkpoint, then end for a retry
    last: bool
    recorded: "RecordedStep"


class Hook(Protocol):
    def after_step(self, loop: "StepLoop", end: StepEnd) -> bool:
        """Runs after every optimizer step; True when it paused the training (its time is not a step's)."""


class Clock:
    """Host time between step ends (one step behind the GPU at most), for tokens/s and the ETA."""

    def __init__(self):
        self.t0 = self.last_end = time.perf_counter()
        self.step_times: list[float] = []
        self.step_tokens: list[int] = []
        self.tokens_this_run = 0

    def step_done(self, tokens: int) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self.last_end)
        self.step_tokens.append(tokens)
        self.tokens_this_run += tokens
        self.last_end = now

    def pause_ends(self) -> None:
        """Step times (tokens/s, ETA) leave validation and checkpoints out."""
        self.last_end = time.perf_counter()

    def stop(self, device) -> float:
        """Wait for the GPU's tail of the last step; the loop's wall seconds."""
        import torch

        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - self.t0
        if self.step_times:
            self.step_times[-1] += time.perf_counter() - self.last_end  # the GPU's tail of the last step
        return seconds

    def steady_tokens_per_second(self) -> float | None:
        """Tokens/s after the warm-up steps (compilation); None with too few steps."""
        times, tokens = self.step_times, self.step_tokens
        warm = min(5, len(times) // 4) if len(times) >= 8 else (1 if len(times) > 1 else 0)
        return (sum(tokens[warm:]) / max(sum(times[warm:]), 1e-9)) if len(times) > warm else None


class StepLoop:
    """Runs optimizer steps until the plan's last, an early stop or a SIGTERM (Preempted, after its checkpoint).

    Holds what a step needs (``strategy.forward_backward`` reads ``sched``, ``budget``, ``scaler``, ``optimizer``,
    ``params``, ``state``, ``stop_requested`` and ``objective``: SFT or a preference loss,
    ``jobs.trainer.preference.Objective``, chosen once for the run) and what the hooks read (``state``, ``clock``,
    ``total_steps``, ``objective``)."""

    def __init__(self, model, strategy, *, sched, budget, optimizer, scheduler, scaler, params, state,
                 total_steps: int, eval_every: int | None, checkpoint_every: int, longest: int,
                 examples_per_step: int, stop_requested: Callable[[], bool], objective=None):
        from jobs.trainer.preference import Objective

        self.objective = objective if objective is not None else Objective("sft")
        self.model, self.strategy = model, strategy
        self.sched, self.budget, self.optimizer, self.scheduler, self.scaler = sched, budget, optimizer, scheduler, scaler
        self.params, self.state, self.total_steps = params, state, total_steps
        self.eval_every, self.checkpoint_every = eval_every, checkpoint_every
        self.longest, self.examples_per_step, self.stop_requested = longest, examples_per_step, stop_requested
        self.clock: Clock | None = None  # made when the loop starts

    def run(self, hooks: list[Hook]) -> None:
        import torch

        state, total, device = self.state, self.total_steps, self.strategy.device
        cuda = device.type == "cuda"
        self.model.train()
        self.clock = Clock()
        while state.step < total and not state.stopped_early:
            k = state.step
            done = self.strategy.forward_backward(self.model, self, k)
            lr_used = self.scheduler.get_last_lr()[0]
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens_seen += done.tokens
            n_examples = len(self.sched.step_indices(k))  # the whole step's, on every rank
            state.examples_seen += n_examples
            self.clock.step_done(done.tokens)
            # No host sync here: the loss goes to pinned memory behind an event, and is read once the next
            # step is queued, so the CPU prepares step k+1 while the GPU still runs step k.
            event = None
            if cuda:
                loss_host = torch.empty(done.loss.shape, dtype=torch.float32, pin_memory=True)
                loss_host.copy_(done.loss, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                loss_host = done.loss
            totals = [float(x) if isinstance(x, torch.Tensor) else x for x in done.n_target]
            recorded = RecordedStep(step=state.step, loss=loss_host, event=event, n_target=totals,
                                    examples=n_examples, tokens=done.tokens, lr=lr_used,
                                    tokens_so_far=self.clock.tokens_this_run, seconds=self.clock.step_times[-1])
            end = StepEnd(step=state.step,
                          due_eval=bool(self.eval_every) and state.step % self.eval_every == 0 and state.step < total,
                          due_checkpoint=state.step % self.checkpoint_every == 0 and state.step < total,
                          stop=done.stop, last=state.step == total, recorded=recorded)
            paused = False
            for hook in hooks:
                paused = hook.after_step(self, end) or paused
            if paused:
                self.clock.pause_ends()
            if end.stop:
                raise Preempted(f"stopped by SIGTERM at step {state.step}/{total}; checkpoint saved",
                                hint="the Job retries and resumes from this checkpoint")


@dataclass
class RecordedStep:
    step: int
    loss: object  # the step's statistics (``objective.micro_loss``): a pinned host tensor behind ``event`` on a GPU
    event: object
    n_target: list  # the totals its terms are divided by (SFT: target tokens)
    examples: int
    tokens: int
    lr: float
    tokens_so_far: int
    seconds: float


def _eta_seconds(step_times: list[float], remaining: int) -> float | None:
    """Seconds left from the recent steps, leaving out the first one (compilation); None: not known yet."""
    if remaining <= 0:
        return 0.0
    recent = step_times[1:][-20:]
    return round(remaining * sum(recent) / len(recent), 1) if recent else None


def _eta(step_times: list[float], remaining: int) -> str:
    """Remaining time from the recent steps, leaving out the first one (compilation, warm-up)."""
    if remaining <= 0:
        return _fmt_eta(0)
    recent = step_times[1:][-20:]
    if not recent:
        return "estimating"
    return _fmt_eta(remaining * sum(recent) / len(recent))


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressLog:
    """Each step's loss into the history, the progress object and the log; a loss that is NaN or inf ends the
    run (Diverged). A step is read one step late on a GPU (the loop does not wait for it)."""

    def __init__(self, logging_interval: int, steps_per_epoch: int, on_progress: Callable[..., None] | None,
                 cuda: bool):
        self.logging_interval, self.steps_per_epoch, self.on_progress = logging_interval, steps_per_epoch, on_progress
        self.cuda = cuda
        self.pending: RecordedStep | None = None  # the step whose loss is still on its way from the GPU

    def after_step(self, loop: StepLoop, end: StepEnd) -> bool:
        if self.pending is not None:
            self._record(loop, self.pending)
        self.pending = end.recorded
        if end.due_eval or end.due_checkpoint or end.stop or end.last or not self.cuda:
            self.flush(loop)  # (on a CPU there is nothing to overlap: every step is logged at once)
        return False

    def flush(self, loop: StepLoop) -> None:
        if self.pending is not None:
            self._record(loop, self.pending)
            self.pending = None

    def _record(self, loop: StepLoop, p: RecordedStep) -> None:
        """Read a finished step's loss (waiting only for that step) and record it."""
        state, total, clock = loop.state, loop.total_steps, loop.clock
        if p.event is not None:
            p.event.synchronize()
        summary = loop.objective.summary(p.loss, p.n_target)
        loss = summary.pop("loss")
        if not math.isfinite(loss):
            raise Diverged(f"the training loss became {loss} at step {p.step}",
                           hint="lower training.learning_rate, use precision: bf16 or fp32, or check the data "
                                "for empty or garbled outputs")
        state.history.append({"step": p.step, "loss": round(loss, 5), "lr": p.lr, "tokens": p.tokens,
                              "examples": p.examples, **{k: round(v, 5) for k, v in summary.items()}})
        if self.on_progress is not None:
            elapsed = time.perf_counter() - clock.t0
            self.on_progress(step=p.step, total_steps=total, loss=round(loss, 5), lr=p.lr,
                             examples_seen=state.examples_seen, tokens_seen=state.tokens_seen,
                             epoch=(p.step - 1) // max(1, self.steps_per_epoch) + 1,
                             tokens_per_s=round(p.tokens_so_far / max(elapsed, 1e-9), 1),
                             eta_s=_eta_seconds(clock.step_times, total - p.step),
                             **{k: round(v, 5) for k, v in summary.items()})  # the objective's own metrics
        if p.step % self.logging_interval == 0 or p.step == total:
            elapsed = time.perf_counter() - clock.t0
            extra = "".join(f"  {k.replace('_', ' ')} {v:.4f}" for k, v in summary.items())
            log.info("step %d/%d  loss %.4f%s  lr %.2e  %d %s  %d tokens  %.0f tok/s  step %.2fs  ETA %s",
                     p.step, total, loss, extra, p.lr, p.examples, "pairs" if loop.objective.preference else "examples",
                     p.tokens, p.tokens_so_far / max(elapsed, 1e-9), p.seconds, _eta(clock.step_times, total - p.step))


class Validation:
    """The validation loss every ``eval_every`` steps and after the last; keeps the adapter with the lowest, and
    this rank's per-example losses of it (gathered once, at :meth:`publish`)."""

    def __init__(self, examples: list[dict], on_progress: Callable[..., None] | None, best_adapter: dict | None):
        self.examples, self.on_progress = examples, on_progress
        self.best_adapter = best_adapter  # the whole adapter of state.best_step (restored from a checkpoint too)
        # this rank's per-example losses of the last validation and of the best one (None: measured before a
        # resume: a checkpoint does not keep them)
        self.last_mine: list[float] | None = None
        self.best_mine: list[float] | None = None

    def after_step(self, loop: StepLoop, end: StepEnd) -> bool:
        if not end.due_eval:
            return False
        state = loop.state
        if self._evaluate(loop):
            self.best_adapter = loop.strategy.adapter(loop.model)
        if self.on_progress is not None:
            last = state.evals[-1]  # its loss, and what the objective measures beside it (val_ + its name)
            self.on_progress(val_loss=last["val_loss"], best_val_loss=state.best_val, best_step=state.best_step,
                             **{f"val_{k}": v for k, v in last.items() if k not in ("step", "val_loss")})
        return True

    def _measure(self, loop: StepLoop) -> float:
        state = loop.state
        losses = loop.objective.validate(loop.model, self.examples, loop.budget, loop.strategy)
        assert losses is not None  # validation runs only with examples
        self.last_mine = losses.mine
        extra = loop.objective.validation_metrics(losses)
        state.evals.append({"step": state.step, "val_loss": round(losses.mean, 5),
                            **{k: round(v, 5) for k, v in extra.items()}})
        log.info("step %d  validation loss %.4f%s", state.step, losses.mean,
                 "".join(f"  {k.replace('_', ' ')} {v:.4f}" for k, v in extra.items()))
        return losses.mean

    def _evaluate(self, loop: StepLoop) -> bool:
        """Validation at this step; True when it is the best so far."""
        state = loop.state
        val = self._measure(loop)
        # the adapter kept for publishing is simply the lowest validation loss seen (EarlyStopping measures a
        # real improvement)
        best = state.best_val is None or val < state.best_val
        if best:
            state.best_val, state.best_step = val, state.step
            self.best_mine = self.last_mine
        return best

    def publish(self, loop: StepLoop) -> tuple[float | None, list[float] | None, int, dict | None]:
        """After the loop: the validation loss of the adapter to publish (the best one), its per-example losses in
        the examples' order (None where it was measured before a resume), its step, and the whole adapter where
        the model cannot hold it (``strategy.publishable``)."""
        state, strategy = loop.state, loop.strategy
        val_loss, published_step, best = None, state.step, None
        mine = None
        if self.examples:
            if state.evals and state.evals[-1]["step"] == state.step:
                val_loss = state.evals[-1]["val_loss"]
            else:
                val_loss = self._measure(loop)
            mine = self.last_mine
            if self.best_adapter is not None and state.best_val is not None and state.best_val < val_loss:
                best, mine = self.best_adapter, self.best_mine
                published_step, val_loss = state.best_step, state.best_val
                log.info("publishing the adapter of step %d (validation loss %.4f), not the last one (%.4f)",
                         published_step, state.best_val, state.evals[-1]["val_loss"])
            elif state.best_val is None or val_loss <= state.best_val:
                state.best_val, state.best_step = val_loss, state.step
        losses = None if mine is None else strategy.gather_per_example(mine, len(self.examples))
        return val_loss, losses, published_step, strategy.publishable(loop.model, best)


class EarlyStopping:
    """Stops after ``patience`` validations without a real improvement (> 1e-4) of the validation loss."""

    def __init__(self, patience: int | None):
        self.patience = patience

    def after_step(self, loop: StepLoop, end: StepEnd) -> bool:
        if not end.due_eval:
            return False
        state = loop.state
        val = state.evals[-1]["val_loss"]
        if state.patience_ref is None or val < state.patience_ref - 1e-4:
            state.patience_ref, state.bad_evals = val, 0
        else:
            state.bad_evals += 1
        if self.patience and state.bad_evals >= self.patience:
            log.info("early stopping at step %d: validation loss has not improved for %d evaluations (best %.4f at "
                     "step %d)", state.step, self.patience, state.best_val, state.best_step)
            state.stopped_early = True
        return False


class Checkpointing:
    """A checkpoint every ``checkpoint_interval_steps`` and on SIGTERM (before the run ends for its retry)."""

    def __init__(self, checkpoints, validation: Validation):
        self.checkpoints, self.validation = checkpoints, validation

    def after_step(self, loop: StepLoop, end: StepEnd) -> bool:
        if not (end.due_checkpoint or end.stop):
            return False
        loop.strategy.save_checkpoint(self.checkpoints, loop.model, loop.optimizer, loop.scheduler, loop.state,
                                      loop.scaler, self.validation.best_adapter)
        return end.due_checkpoint


class CompileCacheSave:
    """Saves the compile cache once the first step has compiled the forward and backward graphs, so that a
    retry before the end of training starts warm too."""

    def __init__(self, cache):
        self.cache = cache

    def after_step(self, loop: StepLoop, end: StepEnd) -> bool:
        if len(loop.clock.step_times) != 1:
            return False
        self.cache.save()
        return True
