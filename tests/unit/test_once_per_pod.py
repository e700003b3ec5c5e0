"""World.once_per_pod over real gloo processes: every rank gets its own pod's result, not global rank 0's.

Four processes stand for two pods of two GPUs each (local ranks 0, 1, 0, 1). Each pod's leader returns a
result naming its pod (as a node-local cache hit and a download to scratch differ between nodes); before the fix
rank 3 got pod 0's."""
import os
import socket

import pytest
import torch.multiprocessing as mp

from jobs.trainer import distributed
from jobs.trainer.distributed import World

pytestmark = pytest.mark.unit

SIZE, PER_POD = 4, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(SIZE))
    world = World(rank=rank, local_rank=rank % PER_POD, size=SIZE)
    distributed.init(world, torch.device("cpu"))
    calls = []

    def fetch():
        calls.append(rank)
        return {"pod": rank // PER_POD, "base_dir": f"/node-{rank // PER_POD}/base-model"}

    got = world.once_per_pod(fetch, "the test's fetch")
    with open(os.path.join(out, f"rank-{rank}"), "w") as f:
        f.write(f"{got['pod']} {got['base_dir']} {len(calls)}")
    dist.destroy_process_group()


def test_every_rank_gets_its_own_pods_result_and_only_pod_leaders_run_it(tmp_path):
    mp.start_processes(_rank, args=(_free_port(), str(tmp_path)), nprocs=SIZE, join=True, start_method="spawn")
    for rank in range(SIZE):
        pod, base_dir, calls = (tmp_path / f"rank-{rank}").read_text().split()
        assert int(pod) == rank // PER_POD and base_dir == f"/node-{rank // PER_POD}/base-model", (rank, pod)
        assert int(calls) == (1 if rank % PER_POD == 0 else 0)  # only each pod's local rank 0 fetches
