"""python -m jobs, with the plan's compile forced on (CPU diagnosis of compile-cache keys)."""
import sys, torch
sys.path.insert(0, "/work/main")
from jobs import fastpath, __main__ as jm
orig = fastpath.plan
def plan(*a, **k):
    p = orig(*a, **k); p.compile = True; p.dtype = torch.bfloat16; return p
fastpath.plan = plan
import atexit
from torch._dynamo.utils import counters
atexit.register(lambda: print("COUNTERS", {k: dict(v) for k, v in counters.items() if k in ("inductor", "aot_autograd")}, flush=True))
sys.exit(jm.main(sys.argv[1:]))
