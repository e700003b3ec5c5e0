"""Every GPU of a pod: PyTorch's elastic launcher (torchrun) and torch.distributed, nothing of our own.

With ``resources.gpus: N > 1`` the container's ``python -m jobs run`` starts itself again under
``python -m torch.distributed.run --standalone --nproc-per-node N`` (:func:`relaunch`), one
process a GPU. With ``resources.nodes: M > 1`` the launcher renders an Indexed Job of M pods and a
headless Service; each pod's torchrun joins a static rendezvous on pod 0 (``PET_*`` variables: node
rank = the pod's completion index), and the world is M x N processes. Every node's local rank 0
downloads the base model to its own scratch volume. The processes train data-parallel over the LoRA parameters: each takes its share
of every optimizer step's examples (``Schedule``), and the gradients are summed across ranks
once a step (:meth:`World.reduce_step`), weighted by target tokens so the step's loss is the
same token mean as on one GPU. Rank 0 alone checkpoints, generates, merges and publishes.

Where the plan says so (``training.fsdp``; ``Plan.fsdp``) the ranks shard the base with PyTorch's FSDP2
instead (:func:`shard_model`): the LoRA gradients are then reduce-scattered inside the backward, and
checkpoints and the published adapter are gathered whole from the shards (:func:`full_tensor`,
:func:`full_optimizer_state`), so they are the same files an unsharded run writes.

torchrun itself exits 1 whatever its workers did; :func:`relaunch` maps its end back onto the
exit-code contract from the termination message each pod's local rank 0 wrote.

A gang: the ranks fail together. A collective whose peer died (its socket closed: a SIGKILL, an
OOM kill, a lost pod) or went silent (a lost node: nothing closes the socket) raises within
``COLLECTIVE_TIMEOUT_S`` instead of torch's default 30 minutes for gloo; :func:`collective` turns that into
:class:`jobs.errors.PeerLost` (exit 75), so every surviving pod ends too, the Job replaces every index, and
the new gang resumes from the newest checkpoint. Waits where one rank works alone (a base-model download,
rank 0's generations or checkpoint, rank 0's evaluate-merge-publish at the end) go through a second, gloo
group with the longer ``WAIT_TIMEOUT_S``.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger("jobs")

#: How long a training collective (the step's all-reduce, validation sums) waits for a silent peer. A healthy
#: step waits only for the slowest rank's compute; torch's default for gloo is 30 minutes, NCCL's 10.
COLLECTIVE_TIMEOUT_S = int(os.environ.get("LORA_JOBS_COLLECTIVE_TIMEOUT_S") or 300)
#: How long a barrier waits while one rank works alone: every pod's base-model download, rank 0's checkpoint
#: upload and generations, and at the end rank 0's evaluation, merge and publish (the other ranks wait for it,
#: so that a failure there fails the whole gang instead of leaving pod 0 to retry alone).
WAIT_TIMEOUT_S = int(os.environ.get("LORA_JOBS_WAIT_TIMEOUT_S") or 7200)
#: How long torchrun's static rendezvous waits for every node. It must outlast a gang restart: the survivors
#: notice within COLLECTIVE_TIMEOUT_S, then the Job controller's back-off (10 s, 20 s, 40 s, ...) and pod start.
RENDEZVOUS_TIMEOUT_S = int(os.environ.get("LORA_JOBS_RENDEZVOUS_TIMEOUT_S") or 900)
# how long node 0 outlives the other nodes' pods at the end of a successful multi-node run (see relaunch)
LEAVE_GRACE_S = int(os.environ.get("LORA_JOBS_LEAVE_GRACE_S") or 10)

_wait_group = None  # the gloo group of World.barrier (WAIT_TIMEOUT_S), made by init()


@contextmanager
def collective(what: str, world: "World"):
    """Run a torch.distributed call; a peer that died or went silent becomes PeerLost (exit 75: the Job
    restarts the whole run from the newest checkpoint), not an unexpected crash or a 30-minute hang."""
    try:
        yield
    except RuntimeError as err:  # gloo: "Connection closed by peer", "Timed out waiting ...ms"; NCCL: DistError
        from jobs.errors import PeerLost

        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PeerLost(f"rank {world.rank} of {world.size} lost a peer during {what}: {first}",
                       hint="every rank of the run stops; the Job restarts all of them from the newest checkpoint")


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self, what: str = "a wait for every rank") -> None:
        """Wait for every rank where one of them may be working alone (WAIT_TIMEOUT_S, not the step's)."""
        if self.size > 1:
            import torch.distributed as dist

            with collective(what, self):
                dist.barrier(group=_wait_group)

    def reduce_step(self, params, n_local: int, loss_local, extras: list[float], device):
        """Sum every rank's gradients (each scaled by its target-token count) and divide by the
        step's total count. The gradients arrive normalised by the rank's own count. ``loss_local``: a scalar or a
        1-D tensor of statistics. Returns, summed over ranks, a tensor [target tokens, *loss_local, *extras] on
        ``device``."""
        import torch
        import torch.distributed as dist

        grads = []
        for p in params:
            if p.grad is None:  # a rank with no example in this step (a short last step)
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        tail = torch.cat([torch.tensor([float(n_local)], device=device), loss_local.float().reshape(-1).to(device),
                          torch.tensor([float(x) for x in extras], device=device)])
        flat = torch.cat([g.reshape(-1).float() * n_local for g in grads] + [tail])
        with collective("the step's gradient all-reduce", self):
            dist.all_reduce(flat)
        total = flat[-len(tail)].clamp(min=1.0)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_((flat[offset:offset + n] / total).view_as(g))
            offset += n
        return flat[-len(tail):]

    def reduce_sum(self, values):
        """All-reduce a small tensor of sums (validation loss and token counts)."""
        if self.size > 1:
            import torch.distributed as dist

            with collective("the validation all-reduce", self):
                dist.all_reduce(values)
        return values

    def once_per_pod(self, fn, what: str):
        """``fn()`` on each pod's local rank 0 (a download into its own scratch, or the node's model cache); every
        rank gets its own pod's result (our own dataclass between our own processes). A pod's ranks are
        contiguous (torchrun: global rank = the pod's first rank + local rank), so that is global rank
        ``rank - local_rank``'s. Pods may differ: one node's cache hit beside another's download to scratch."""
        if self.size == 1:
            return fn()
        import torch.distributed as dist

        mine = fn() if self.local_rank == 0 else None
        self.barrier(what)
        leaders: list = [None] * self.size
        with collective(what, self):
            dist.all_gather_object(leaders, mine)
        return leaders[self.rank - self.local_rank]

    def any_rank(self, flag: bool, device, what: str) -> bool:
        """Whether ``flag`` holds on any rank (every rank calls it)."""
        if self.size == 1:
            return flag
        return float(all_gather_floats(self, [float(flag)], device, what).max()) > 0

    def on_main(self, fn):
        """``fn()`` on rank 0; None elsewhere."""
        return fn() if self.main else None

    def scratch(self, workdir):
        """This process's own scratch folder: ``workdir`` on rank 0, a folder of its own in it elsewhere."""
        return workdir if self.main else workdir / f"rank-{self.rank}"


def broadcast_trainable(world: World, model) -> None:
    """Every rank starts from rank 0's adapter weights (what DDP does at construction)."""
    if world.size <= 1:
        return
    import torch
    import torch.distributed as dist

    world.barrier("rank 0's generations with the base model")  # rank 0 may have generated alone
    with torch.no_grad(), collective("the adapter broadcast", world):
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)


# ------------------------------------------------------------------ FSDP2 (training.fsdp)

def shard_model(world: World, model) -> None:
    """Shard the PEFT-wrapped model over every rank with PyTorch's FSDP2 (``fully_shard``): each decoder
    layer is one unit, the causal LM (embeddings, final norm, lm_head, tied or not) the root; a 1-D mesh
    over all ranks. Frozen base weights and LoRA weights alike become DTensor shards; the LoRA gradients
    are reduce-scattered in the backward (no :meth:`World.reduce_step` all-reduce for them).

    The job computes its loss from the decoder and the lm_head weight, not through ``forward``
    (``fastpath.lm_loss``), so that computation is registered as the root's forward method: FSDP2
    gathers the root's parameters for it and keeps them until the backward.

    The model is on the meta device (:func:`load_sharded`: shards first, weights after).
    """
    import types

    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from jobs.trainer import fastpath

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (world.size,))
    base = fastpath._unwrap(model)
    # Parameters keep their dtypes (no MixedPrecisionPolicy): the frozen base stays in the plan's dtype,
    # the LoRA weights in fp32 master copies, exactly as without sharding.
    with collective("FSDP2 sharding of the base", world):
        for layer in fastpath._decoder(base).layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(base, mesh=mesh)

    def sharded_loss(self, batch, per_example: bool = False):
        return fastpath.base_example_losses(self, batch) if per_example else fastpath.base_lm_loss(self, batch)

    setattr(base, fastpath.FSDP_LOSS_METHOD, types.MethodType(sharded_loss, base))
    register_fsdp_forward_method(base, fastpath.FSDP_LOSS_METHOD)
    held, total = local_parameter_counts(model)
    log.info("FSDP2: the base is sharded over %d ranks; rank %d holds %d of %d parameters (%.1f%%)",
             world.size, world.rank, held, total, 100 * held / max(total, 1))


def load_sharded(world: World, model_dir: str, config, *, precision: str, device, seed: int, wrap, prepare):
    """The FSDP2 model of a run, loaded without any rank holding the whole base on its GPU.

    Rank 0 loads the base into host memory and wraps it with LoRA (``wrap``, after ``seed``: the adapter
    an unsharded run starts from). Every rank builds the same model on the meta device
    (:func:`jobs.trainer.modelio.build_on_meta`), wraps and prepares it (``prepare``), shards it
    (:func:`shard_model`) and allocates only its shards (``to_empty``); then rank 0 broadcasts each
    tensor, one at a time, and every rank keeps its rows. A GPU so holds its shards plus one whole tensor
    (the largest, the embedding), whatever the size of the base; before this change each rank loaded
    the whole base (host memory, then its GPU) and a 70B bf16 base fit neither.

    Returns (the sharded model, rank 0's host copy or None on the other ranks). Rank 0 keeps its copy:
    after training it takes the gathered adapter and is what rank 0 evaluates, saves and merges.
    """
    import resource
    import time

    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from jobs.trainer import fastpath
    from jobs.errors import DataError
    from jobs.trainer.modelio import build_on_meta, load_model

    started = time.perf_counter()
    model = prepare(wrap(build_on_meta(config, precision=precision)))
    shard_model(world, model)
    model.to_empty(device=device)  # this rank's shards, allocated, not yet filled
    if device.type == "cuda":
        fastpath.skip_cpu_isa_probe()  # prepare_model tells from the parameters' device, on meta then
    targets = list(model.named_parameters()) + list(model.named_buffers())
    source, problem = None, None
    if world.main:
        try:
            base = load_model(model_dir, precision=precision, device=None)
        except DataError as err:  # told to every rank below, so that each fails with it (not as a lost peer)
            problem = (err.message, err.hint)
        else:
            torch.manual_seed(seed)  # as the unsharded path: the adapter's random A after the load
            source = wrap(base)
            have = {**dict(source.named_parameters(remove_duplicate=False)),
                    **dict(source.named_buffers(remove_duplicate=False))}
            missing = [n for n, t in targets if n not in have or tuple(have[n].shape) != tuple(t.shape)]
            if missing:
                problem = (f"the base loaded on rank 0 and the model built from its config.json differ in "
                           f"{len(missing)} tensors (first: {missing[0]})",
                           "training.fsdp needs a transformers model whose checkpoint loads into the class its "
                           "config.json names; set training.fsdp: off if the base fits one GPU")
    # reading a 70B base into host memory can outlast a collective's timeout: the others wait at a barrier
    world.barrier("rank 0's load of the base into host memory")
    box = [problem]
    with collective("the check of rank 0's base", world):
        dist.broadcast_object_list(box, src=0)  # strings between our own processes
    if box[0]:
        raise DataError(box[0][0], hint=box[0][1])
    moved = 0
    with torch.no_grad():
        for name, t in targets:
            full = (have[name].detach().to(device=device, dtype=t.dtype).contiguous() if world.main
                    else torch.empty(tuple(t.shape), dtype=t.dtype, device=device))
            with collective("the broadcast of the base's weights from rank 0", world):
                dist.broadcast(full, src=0)
            if isinstance(t, DTensor):
                t.to_local().copy_(shard_like(t, full).to_local())
            else:
                t.copy_(full)
            moved += full.numel() * full.element_size()
            del full
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    log.info("FSDP2: rank %d built the base on the meta device and took its shards of %d tensors (%.1f GiB) "
             "from rank 0 in %.0f s; peak host memory of this rank %.2f GiB", world.rank, len(targets),
             moved / 2**30, time.perf_counter() - started, peak)
    return model, source


def local_parameter_counts(model) -> tuple[int, int]:
    """(parameters this rank holds, parameters of the model): a DTensor counts its local shard."""
    from torch.distributed.tensor import DTensor

    held = total = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        held += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return held, total


def is_sharded(model) -> bool:
    from jobs.trainer import fastpath

    return hasattr(fastpath._unwrap(model), fastpath.FSDP_LOSS_METHOD)


def full_tensor(v):
    """The whole tensor of a DTensor shard (a collective: every rank calls it in the same order); other
    tensors as they are."""
    from torch.distributed.tensor import DTensor

    return v.full_tensor() if isinstance(v, DTensor) else v


def shard_like(like, full):
    """``full`` (the same on every rank, e.g. read from a checkpoint) cut into this rank's shard of the
    DTensor ``like``; a plain ``like`` gets ``full`` back. No communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.detach().to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def full_optimizer_state(optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded moment gathered whole: the same dict an unsharded
    run saves (keyed by parameter index), so a checkpoint resumes with or without sharding."""
    sd = optimizer.state_dict()
    return {"param_groups": sd["param_groups"],
            "state": {pid: {k: full_tensor(v).detach().cpu() if hasattr(v, "detach") else v for k, v in st.items()}
                      for pid, st in sd["state"].items()}}


def shard_optimizer_state(optimizer, sd: dict) -> dict:
    """A whole optimizer state (from a checkpoint) cut into this rank's shards of the sharded parameters."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for pid, st in sd["state"].items():
        p = params[int(pid)]
        state[pid] = {k: shard_like(p, v) if hasattr(v, "shape") and tuple(v.shape) == tuple(p.shape) else v
                      for k, v in st.items()}
    return {"param_groups": sd["param_groups"], "state": state}


def all_gather_floats(world: World, values: list[float], device, what: str):
    """Every rank's ``values`` as a [world, len(values)] float64 tensor."""
    import torch
    import torch.distributed as dist

    mine = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.empty_like(mine) for _ in range(world.size)]
    with collective(what, world):
        dist.all_gather(out, mine)
    return torch.stack(out)


def from_env() -> World:
    return World(rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                 size=int(os.environ.get("WORLD_SIZE", "1")))


def init(world: World, device) -> None:
    """Join the process group torchrun set up: NCCL between GPUs, gloo on CPUs; a collective waits
    COLLECTIVE_TIMEOUT_S for a silent peer, a barrier WAIT_TIMEOUT_S (its own gloo group)."""
    global _wait_group
    if world.size <= 1:
        return
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    _wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=WAIT_TIMEOUT_S))
    log.info("rank %d of %d (local rank %d) on %s; a silent peer ends the run after %d s", world.rank, world.size,
             world.local_rank, device, COLLECTIVE_TIMEOUT_S)


def shutdown(world: World) -> None:
    """Leave together: the other ranks wait here until rank 0 has published (rank 0 calls this last), so a
    failure of rank 0 after training ends every pod and the gang restarts as a whole."""
    global _wait_group
    if world.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            world.barrier("the wait for rank 0 to publish")
            dist.destroy_process_group()
        _wait_group = None


def visible_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def relaunch(gpus: int, argv: list[str], *, nodes: int = 1) -> int:
    """Run ``python -m jobs <argv>`` under torchrun with one process per GPU (``gpus`` per node; 1 on a CPU
    node) and return the job's exit code. With ``nodes > 1`` torchrun takes the rendezvous from the
    ``PET_*`` variables the launcher put on each pod (node rank, pod 0's address and port)."""
    from jobs.trainer.cpus import cpu_budget, threads_per_process
    from jobs.errors import ExitCode

    if nodes > 1:
        rendezvous = [f"--nnodes={nodes}", f"--node-rank={os.environ.get('PET_NODE_RANK', '0')}",
                      f"--master-addr={os.environ.get('PET_MASTER_ADDR', '127.0.0.1')}",
                      f"--master-port={os.environ.get('PET_MASTER_PORT', '29500')}"]
        log.info("node %s of %d: starting %d training process%s (torchrun %s)", os.environ.get("PET_NODE_RANK", "0"),
                 nodes, gpus, "es" if gpus > 1 else "", " ".join(rendezvous))
        # static rendezvous: its store's timeout is how long the nodes of a restarted gang wait for each other
        rendezvous.append(f"--rdzv-conf=timeout={RENDEZVOUS_TIMEOUT_S}")
    else:
        rendezvous = ["--standalone"]
        log.info("%d GPUs: starting one training process per GPU (torchrun --standalone --nproc-per-node %d)",
                 gpus, gpus)
    # No restarts inside the pod: a restart is the Job's (it counts them, and only it can restart every pod of
    # a multi-node gang). When one worker dies, torchrun stops the others (SIGTERM, SIGKILL after 30 s).
    cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc-per-node={gpus}",
           "--max-restarts=0", "-m", "jobs", *argv]
    env = {**os.environ, "LORA_JOBS_UNDER_TORCHRUN": "1"}
    if not env.get("OMP_NUM_THREADS"):
        # torchrun would give each worker one thread; give it its share of the pod's CPU limit instead
        budget = cpu_budget()
        env["OMP_NUM_THREADS"] = str(threads_per_process(gpus, budget))
        log.info("CPU: %s torch thread%s per training process (a budget of %g CPUs)", env["OMP_NUM_THREADS"],
                 "" if env["OMP_NUM_THREADS"] == "1" else "s", round(budget, 2))
    path = os.environ.get("TERMINATION_MESSAGE_PATH", "/dev/termination-log")
    try:
        open(path, "w").close()  # only what rank 0 writes from now on counts
    except OSError:
        pass
    proc = subprocess.Popen(cmd, env=env)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        rc = proc.wait()
    # torchrun forwards SIGTERM to the workers (rank 0 checkpoints) but exits 1 itself:
    # the code that counts is the one this pod's local rank 0 wrote into the termination message.
    try:
        with open(path, encoding="utf-8") as f:
            code = int(json.loads(f.read())["exit_code"])
    except (OSError, ValueError, KeyError, TypeError):
        code = rc if rc in (0,) else int(ExitCode.UNEXPECTED if rc != 75 else ExitCode.TRANSIENT)
    if nodes > 1 and code == 0 and os.environ.get("PET_NODE_RANK", "0") == "0" and LEAVE_GRACE_S > 0:
        # The run's Job (successPolicy: index 0) or JobSet is done the moment this pod ends, and the controller
        # then deletes every pod still running, log and all. The other nodes left torchrun's exit barrier with
        # this one; give their pods the time to end first, so `launcher logs --rank K` can read them after.
        log.info("node 0: published; waiting %d s for the other %d node%s' pods to end before this one does",
                 LEAVE_GRACE_S, nodes - 1, "s" if nodes > 2 else "")
        time.sleep(LEAVE_GRACE_S)
    return code
