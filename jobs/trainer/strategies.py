"""How the training processes share the work: one device, data parallel, or FSDP2 — chosen once, at setup.

Every difference between the three lives here, behind :class:`Strategy`; the recipe (``jobs.trainer.recipe``)
and the step loop (``jobs.trainer.loop``) never ask for the rank, the world size or whether the base is sharded.

* :class:`SingleDevice`: one process.
* :class:`DataParallel`: every rank holds the whole model; each takes its share of a step's examples, and the
  LoRA gradients are all-reduced once a step, weighted by target tokens (:meth:`World.reduce_step`).
* :class:`FSDP2`: the base and the LoRA weights are sharded (``distributed.shard_model``); gradients are
  reduce-scattered in the backward, every rank runs as many micro-batches, checkpoints are gathered whole.

The process group, torchrun and the collectives themselves stay in ``jobs.trainer.distributed``.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Protocol

from jobs.errors import OutOfMemory, is_gpu_out_of_memory
from jobs.trainer.distributed import World

log = logging.getLogger("jobs")


@dataclass
class StepTotals:
    """One optimizer step's forward and backward, summed over every rank: the objective's statistics (a small tensor
    on the device, read later without a sync; ``loss[0]`` the loss sum for SFT), the totals its terms are divided
    by (``objective.counts``: SFT's target tokens), the tokens, and whether any rank was asked to stop."""

    loss: Any
    n_target: list  # floats, or tensors on the device (data parallel: read after the step)
    tokens: int
    stop: bool


class Strategy(Protocol):
    """One way of spreading a run over its training processes."""

    world: World
    device: Any  # torch.device
    #: whether the base's generations run before training (on the model as loaded); False: after training,
    #: on the whole model :meth:`finish_training` gives rank 0, with the adapter switched off
    generates_base_before_training: bool

    def load(self, model_dir: str, config, *, spec, plan, precision: str, adapter=None): ...

    def wrap(self, model, spec, plan, adapter=None):
        """The model LoRA-wrapped and prepared (``fastpath.prepare_model``), the same adapter on every rank: new, or
        ``adapter``'s weights (a folder: ``spec.base_adapter``, fetched)."""

    def uncompiled(self, model) -> ContextManager:
        """Where the base's validation loss is measured before training (before the compile cache is restored)."""

    def forward_backward(self, model, loop, k: int) -> StepTotals:
        """Forward and backward of optimizer step ``k`` (``loop``: a :class:`jobs.trainer.loop.StepLoop`); leaves
        the step's gradients, normalised by its target tokens over every rank, in the LoRA parameters."""

    def validation_batches(self, examples: list[dict], tokens: int) -> tuple[list[dict], int]:
        """This rank's validation micro-batches, its share of the examples packed in order (every example whole,
        none dropped), and how many of them count (the rest are fillers)."""

    def gather_per_example(self, mine: list[float], n: int) -> list[float]:
        """Every rank's per-example values of a validation (``mine``: this rank's share) in the ``n`` examples'
        order; a collective with several ranks."""

    def validation_oom(self, tokens: int, msg: str) -> None:
        """Raise where a rank cannot retry a validation alone after running out of memory."""

    def reduce_sum(self, values):
        """Sum a small tensor over every rank, in place."""

    def adapter(self, model) -> dict:
        """The whole adapter on the CPU (with sharding a collective: every rank calls it)."""

    def save_checkpoint(self, checkpoints, model, optimizer, scheduler, state, scaler, best_adapter) -> None:
        """Write a checkpoint (the main rank writes; every rank calls this, then waits for the others)."""

    def publishable(self, model, best_adapter: dict | None) -> dict | None:
        """After training: put ``best_adapter`` (None: keep the model's) where the main rank publishes it from.
        Returns the adapter to publish where the model cannot hold it (sharded), else None."""

    def finish_training(self, trained, spec, config, plan) -> None:
        """On the main rank after training: ``trained.model`` and ``trained.device`` become the whole model that is
        evaluated, saved and merged (``trained``: a :class:`jobs.trainer.recipe.Trained`)."""

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the main rank; None on the others."""

    def shutdown(self) -> None:
        """Leave together: every rank waits here for the main rank's publish."""


def choose(world: World, plan, device) -> Strategy:
    """The run's strategy, from the plan (``plan.fsdp``) and the number of training processes."""
    if plan.fsdp:
        return FSDP2(world, device)
    if world.size > 1:
        return DataParallel(world, device)
    return SingleDevice(world, device)


# --------------------------------------------------------------------------- one device

class SingleDevice:
    generates_base_before_training = True

    def __init__(self, world: World | None = None, device=None):
        import torch

        self.world = world or World()
        self.device = device if device is not None else torch.device("cpu")

    def load(self, model_dir: str, config, *, spec, plan, precision: str, adapter=None):
        from jobs.trainer.modelio import load_model

        return load_model(model_dir, precision=precision, quantization=spec.quantization.mode, device=self.device,
                          double_quant=spec.quantization.double_quant)

    def wrap(self, model, spec, plan, adapter=None):
        import torch

        from jobs.trainer import fastpath
        from jobs.trainer.train import wrap_lora

        torch.manual_seed(spec.training.seed)  # LoRA A is initialised randomly: the same seed, the same run
        return fastpath.prepare_model(wrap_lora(model, spec, adapter), plan)

    def uncompiled(self, model) -> ContextManager:
        return contextlib.nullcontext()

    def forward_backward(self, model, loop, k: int) -> StepTotals:
        stats, totals, mbs = _local_forward_backward(model, loop, k, self.device, lambda counts: (counts, 1.0))
        return StepTotals(stats, totals, sum(len(mb["input_ids"]) for mb in mbs), loop.stop_requested())

    def validation_batches(self, examples: list[dict], tokens: int) -> tuple[list[dict], int]:
        from jobs.trainer import fastpath

        # this rank's share packed in its order (no shuffle): the micro-batches' examples, one after another, are
        # the share's, so each example's loss (fastpath.example_losses) is put back by position
        share = examples[self.world.rank::self.world.size]
        mbs = fastpath.pack_rows(share, tokens, seed=0, shuffle=False)
        packed = sum(len(mb["seq_lens"]) for mb in mbs)
        if packed != len(share):
            raise ValueError(f"validation packed {packed} of {len(share)} examples (one shorter than 2 tokens?)")
        return mbs, len(mbs)

    def gather_per_example(self, mine: list[float], n: int) -> list[float]:
        world = self.world
        if world.size == 1:
            return list(mine)
        from jobs.trainer.distributed import all_gather_floats

        share = -(-n // world.size)  # rank r holds examples r, r + world, ...: at most this many
        got = all_gather_floats(world, list(mine) + [0.0] * (share - len(mine)), self.device,
                                "the per-example validation losses")
        return [float(got[i % world.size, i // world.size]) for i in range(n)]

    def validation_oom(self, tokens: int, msg: str) -> None:
        return None  # this rank halves its micro-batches and runs the validation again

    def reduce_sum(self, values):
        return self.world.reduce_sum(values)

    def adapter(self, model) -> dict:
        from peft import get_peft_model_state_dict

        return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}

    def save_checkpoint(self, checkpoints, model, optimizer, scheduler, state, scaler, best_adapter) -> None:
        checkpoints.save(model, optimizer, scheduler, state, scaler, best_adapter)

    def publishable(self, model, best_adapter: dict | None) -> dict | None:
        if best_adapter is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, {k: v.to(self.device) for k, v in best_adapter.items()})
        return None

    def finish_training(self, trained, spec, config, plan) -> None:
        return None  # the model trained is the one to evaluate and merge

    def on_main(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def shutdown(self) -> None:
        return None


def _local_forward_backward(model, loop, k: int, device, agree: Callable[[list[float]], tuple[list, float]]):
    """Step ``k``'s micro-batches on this rank alone; on CUDA out-of-memory, smaller micro-batches and the same
    examples (``loop.budget`` halves, recorded in ``loop.state``). ``agree(counts)`` turns this rank's normalisers of
    the step (``loop.objective.counts``: they do not depend on the layout) into the totals each loss term is divided
    by and a factor on every term (a collective where the ranks must agree first: called once, before any retry).
    Returns (the step's statistics, the totals, micro-batches)."""
    import torch

    from jobs.trainer import fastpath
    from jobs.trainer.train import free_memory

    budget, state, objective = loop.budget, loop.state, loop.objective
    mbs = loop.sched.micro_batches(k, budget.tokens, objective.pack)
    totals, factor = agree(objective.counts(mbs))
    scale = [factor / max(1.0, float(t)) for t in totals]
    while True:
        try:
            stats = torch.zeros(objective.stats_size, dtype=torch.float32, device=device)
            for mb in mbs:
                loss, mb_stats = objective.micro_loss(model, fastpath.to_device(mb, device), mb, scale)
                loop.scaler.scale(loss).backward()
                stats += mb_stats
            return stats, totals, mbs
        except RuntimeError as err:
            if not is_gpu_out_of_memory(err):
                raise
            msg = str(err).splitlines()[0]
        loop.optimizer.zero_grad(set_to_none=True)
        free_memory()
        before = budget.tokens
        if not budget.halve():
            raise OutOfMemory(
                f"out of GPU memory at step {k + 1} even at {before} tokens per micro-batch "
                f"(the longest example is {loop.longest} tokens): {msg}",
                hint="lower training.max_seq_length, use quantization.mode: 4bit, turn on "
                     "training.gradient_checkpointing, or use a GPU with more memory")
        state.oom_backoffs.append({"step": k + 1, "from": before, "to": budget.tokens})
        state.tokens_per_micro_batch = budget.tokens
        log.warning("out of GPU memory at step %d with micro-batches of %d tokens: retrying the step at %d "
                    "(same %d examples)", k + 1, before, budget.tokens, loop.examples_per_step)
        mbs = loop.sched.micro_batches(k, budget.tokens, objective.pack)


# ------------------------------------------------------------------------ data parallel

class DataParallel(SingleDevice):
    """Every rank holds the whole model and trains on its share of each step; rank 0 writes and publishes."""

    def wrap(self, model, spec, plan, adapter=None):
        from jobs.trainer.distributed import broadcast_trainable

        model = super().wrap(model, spec, plan, adapter)
        broadcast_trainable(self.world, model)  # every rank starts from rank 0's adapter (what DDP does)
        return model

    def forward_backward(self, model, loop, k: int) -> StepTotals:
        world, objective = self.world, loop.objective

        def agree(counts):
            if not objective.preference:
                # SFT: each rank normalises by its own target tokens, and the all-reduce weights the ranks by them
                return counts, 1.0
            # per pair, or a loss of two terms (ORPO): the ranks agree on the step's totals first; each rank's terms
            # are divided by them and scaled by the world size, which the all-reduce's mean takes back out
            from jobs.trainer.distributed import all_gather_floats

            got = all_gather_floats(world, counts, self.device, "the step's loss normalisers")
            return [float(x) for x in got.sum(0)], float(world.size)

        stats, totals, mbs = _local_forward_backward(model, loop, k, self.device, agree)
        tokens = sum(len(mb["input_ids"]) for mb in mbs)
        # one all-reduce of the LoRA gradients a step; reading its stop flag is a host sync: all stop together
        reduced = world.reduce_step(loop.params, 1.0 if objective.preference else totals[0], stats,
                                    [tokens, float(loop.stop_requested())], self.device)
        n = objective.stats_size
        if not objective.preference:
            totals = [reduced[0]]  # every rank's target tokens
        return StepTotals(reduced[1:1 + n], totals, int(reduced[1 + n]), bool(reduced[2 + n] > 0))

    def save_checkpoint(self, checkpoints, model, optimizer, scheduler, state, scaler, best_adapter) -> None:
        if self.world.main:  # every rank holds the same weights: rank 0 writes them
            checkpoints.save(model, optimizer, scheduler, state, scaler, best_adapter)
        self.world.barrier()

    def on_main(self, fn: Callable[[], Any]) -> Any:
        if self.world.main:
            return fn()
        log.info("rank %d: training done; rank 0 publishes", self.world.rank)
        return None

    def shutdown(self) -> None:
        from jobs.trainer.distributed import shutdown

        shutdown(self.world)


# -------------------------------------------------------------------------------- FSDP2

class FSDP2(DataParallel):
    """The base and the adapter sharded over every rank (training.fsdp; ``distributed.shard_model``)."""

    generates_base_before_training = False  # the sharded model cannot generate on rank 0 alone

    def __init__(self, world: World, device):
        super().__init__(world, device)
        self.source = None  # rank 0's host copy of the base (distributed.load_sharded), for after training

    def load(self, model_dir: str, config, *, spec, plan, precision: str, adapter=None):
        from jobs.trainer import distributed, fastpath
        from jobs.trainer.train import wrap_lora

        model, self.source = distributed.load_sharded(
            self.world, model_dir, config, precision=precision, device=self.device, seed=spec.training.seed,
            wrap=lambda m: wrap_lora(m, spec, adapter), prepare=lambda m: fastpath.prepare_model(m, plan))
        return model

    def wrap(self, model, spec, plan, adapter=None):
        return model  # load_sharded wrapped and prepared it (on rank 0's copy too)

    def uncompiled(self, model) -> ContextManager:
        from jobs.trainer import fastpath

        # the model already carries the new adapter: lora_B is 0, so this is still the base's loss
        return fastpath.eager_layers(model)

    def forward_backward(self, model, loop, k: int) -> StepTotals:
        return _sharded_forward_backward(model, loop, k, self.world, self.device)

    def validation_batches(self, examples: list[dict], tokens: int) -> tuple[list[dict], int]:
        from jobs.trainer.distributed import all_gather_floats
        from jobs.trainer.train import _filler

        mbs, counted = super().validation_batches(examples, tokens)
        # every rank runs as many forwards (each gathers the sharded weights)
        most = int(all_gather_floats(self.world, [len(mbs)], self.device, "validation batch counts").max())
        return mbs + [_filler(examples, tokens)] * (most - len(mbs)), counted

    def validation_oom(self, tokens: int, msg: str) -> None:
        # as in a sharded step: a rank cannot retry alone while the others wait in its collectives
        raise OutOfMemory(f"validation ran out of GPU memory at {tokens} tokens per micro-batch on "
                          f"an FSDP2-sharded run ({msg})",
                          hint="set training.gpu_memory_gib lower (smaller micro-batches are planned), "
                               "or shard over more GPUs")

    def adapter(self, model) -> dict:
        from peft import get_peft_model_state_dict

        from jobs.trainer.distributed import full_tensor

        return {k: full_tensor(v).detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}

    def save_checkpoint(self, checkpoints, model, optimizer, scheduler, state, scaler, best_adapter) -> None:
        from jobs.trainer.distributed import full_optimizer_state

        # every rank gathers its shards; rank 0 writes the whole state
        whole, whole_opt = self.adapter(model), full_optimizer_state(optimizer)
        if self.world.main:
            checkpoints.save(model, optimizer, scheduler, state, scaler, best_adapter, adapter=whole,
                             optimizer_state=whole_opt)
        self.world.barrier()

    def publishable(self, model, best_adapter: dict | None) -> dict | None:
        return best_adapter if best_adapter is not None else self.adapter(model)  # every rank gathers

    def finish_training(self, trained, spec, config, plan) -> None:
        # The sharded model cannot run on rank 0 alone: what follows (generations, the adapter's files, the
        # merge) runs on the unsharded base with the whole adapter the ranks gathered, as on one GPU.
        import torch
        from peft import set_peft_model_state_dict

        from jobs.trainer import fastpath
        from jobs.trainer.train import free_memory

        trained.model = None
        free_memory()
        device, end_plan = self.device, plan
        if not fastpath.whole_base_fits(config, plan):
            # a base that needed sharding to train may not fit one GPU even for generations: rank 0 then
            # evaluates, saves and merges on the CPU (slow for such a base, but the trained adapter is published)
            log.warning("FSDP2: the whole base (~%.0f GiB) does not fit one GPU's %.0f GiB budget: rank 0 "
                        "evaluates, saves and merges on the CPU, which is slow for a base this size",
                        fastpath.estimate_param_count(config) * torch.finfo(plan.dtype).bits / 8 / 2**30,
                        plan.memory_budget_bytes / 2**30)
            device = torch.device("cpu")
            end_plan = fastpath.plan(config, spec.training.model_copy(update={"fsdp": "off"}), device)
        model = fastpath.prepare_model(self.source.to(device), end_plan)  # the copy the shards came from
        self.source = None
        set_peft_model_state_dict(model, {k: v.to(device) for k, v in trained.result.adapter.items()})
        log.info("FSDP2: rank 0 holds the whole base again (on %s) with the gathered adapter of step %d",
                 device, trained.result.published_step)
        trained.model, trained.device = model, device


def _sharded_forward_backward(model, loop, k: int, world: World, device) -> StepTotals:
    """Forward and backward of optimizer step k on an FSDP2-sharded model; leaves the gradients, summed over
    ranks and normalised by the step's totals (``loop.objective.counts``: target tokens, pairs), in the (sharded)
    parameters' grads.

    The ranks first agree on the step's totals (so each rank's loss terms are divided by the step's, like the
    data-parallel path's weighting), its tokens, the stop flag and the most micro-batches any rank
    has: a rank with fewer runs filler micro-batches whose loss is multiplied by 0, because each forward
    and backward gathers the weights from every rank. Gradient sync is off for all but the last micro-batch
    (the LoRA gradients accumulate unsharded, then one reduce-scatter); FSDP2 averages over ranks, so each
    rank's loss is scaled by the world size to make that average the sum. No out-of-memory back-off: one
    rank cannot retry alone while the others wait in its collectives."""
    import torch

    from jobs.trainer import fastpath
    from jobs.trainer.distributed import all_gather_floats

    budget, objective = loop.budget, loop.objective
    mbs = loop.sched.micro_batches(k, budget.tokens, objective.pack)
    counts = objective.counts(mbs)
    tokens_local = sum(len(mb["input_ids"]) for mb in mbs)
    agreed = all_gather_floats(world, [*counts, tokens_local, float(loop.stop_requested()), len(mbs)], device,
                               "the step's token counts")
    c = len(counts)
    totals = [float(x) for x in agreed[:, :c].sum(0)]
    real_tokens = int(agreed[:, c].sum())
    stop_here, most = bool(agreed[:, c + 1].max() > 0), int(agreed[:, c + 2].max())
    counted = len(mbs)
    runs = mbs + [objective.filler(loop.sched.examples, budget.tokens)] * (most - counted)
    (log.info if k == 0 else log.debug)("FSDP2 step %d: %d micro-batches on rank %d and %d filler (the busiest "
                                        "rank has %d)", k + 1, counted, world.rank, most - counted, most)
    stats = torch.zeros(objective.stats_size, dtype=torch.float32, device=device)
    scale = [world.size / max(1.0, t) for t in totals]
    root = fastpath._unwrap(model)  # the FSDP2 root (jobs.trainer.distributed.shard_model)
    try:
        for i, mb in enumerate(runs):
            root.set_requires_gradient_sync(i == len(runs) - 1)
            loss, mb_stats = objective.micro_loss(model, fastpath.to_device(mb, device), mb,
                                                  scale if i < counted else [0.0] * c)
            loop.scaler.scale(loss).backward()
            if i < counted:
                stats += mb_stats
    except RuntimeError as err:
        if not is_gpu_out_of_memory(err):
            raise
        raise OutOfMemory(f"out of GPU memory at step {k + 1} with micro-batches of {budget.tokens} tokens on an "
                          f"FSDP2-sharded run: {str(err).splitlines()[0]}",
                          hint="set training.gpu_memory_gib lower (smaller micro-batches are planned), turn on "
                               "training.gradient_checkpointing, or shard over more GPUs") from None
    finally:
        root.set_requires_gradient_sync(True)
    world.reduce_sum(stats)
    return StepTotals(stats, totals, real_tokens, stop_here)
