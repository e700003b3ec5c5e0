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

torchrun itself exits 1 whatever its workers did; :func:`relaunch` maps its end back onto the
exit-code contract from the termination message rank 0 wrote.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass

log = logging.getLogger("jobs")


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def reduce_step(self, params, n_local: int, loss_local, extras: list[float], device):
        """Sum every rank's gradients (each scaled by its target-token count) and divide by the
        step's total count. The gradients arrive normalised by the rank's own count. Returns, summed
        over ranks, a tensor [target tokens, loss sum, *extras] on ``device``."""
        import torch
        import torch.distributed as dist

        grads = []
        for p in params:
            if p.grad is None:  # a rank with no example in this step (a short last step)
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        tail = torch.stack([torch.tensor(float(n_local), device=device), loss_local.float().reshape(()).to(device),
                            *[torch.tensor(float(x), device=device) for x in extras]])
        flat = torch.cat([g.reshape(-1).float() * n_local for g in grads] + [tail])
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

            dist.all_reduce(values)
        return values


def broadcast_trainable(world: World, model) -> None:
    """Every rank starts from rank 0's adapter weights (what DDP does at construction)."""
    if world.size <= 1:
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)


def from_env() -> World:
    return World(rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                 size=int(os.environ.get("WORLD_SIZE", "1")))


def init(world: World, device) -> None:
    """Join the process group torchrun set up: NCCL between GPUs, gloo on CPUs."""
    if world.size <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    log.info("rank %d of %d (local rank %d) on %s", world.rank, world.size, world.local_rank, device)


def shutdown(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


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
    from jobs.errors import ExitCode

    if nodes > 1:
        rendezvous = [f"--nnodes={nodes}", f"--node-rank={os.environ.get('PET_NODE_RANK', '0')}",
                      f"--master-addr={os.environ.get('PET_MASTER_ADDR', '127.0.0.1')}",
                      f"--master-port={os.environ.get('PET_MASTER_PORT', '29500')}"]
        log.info("node %s of %d: starting %d training process%s (torchrun %s)", os.environ.get("PET_NODE_RANK", "0"),
                 nodes, gpus, "es" if gpus > 1 else "", " ".join(rendezvous))
    else:
        rendezvous = ["--standalone"]
        log.info("%d GPUs: starting one training process per GPU (torchrun --standalone --nproc-per-node %d)",
                 gpus, gpus)
    cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc-per-node={gpus}",
           "-m", "jobs", *argv]
    env = {**os.environ, "LORA_JOBS_UNDER_TORCHRUN": "1"}
    env.setdefault("OMP_NUM_THREADS", "4")
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
    # the code that counts is the one rank 0 wrote into the termination message.
    try:
        with open(path, encoding="utf-8") as f:
            return int(json.loads(f.read())["exit_code"])
    except (OSError, ValueError, KeyError, TypeError):
        return rc if rc in (0,) else int(ExitCode.UNEXPECTED if rc != 75 else ExitCode.TRANSIENT)
