"""Our fast path (jobs.fastpath) on the shapes and data of ../shared/bench/trl_baseline.py.

Trains PEFT LoRA (r=16, alpha=16, dropout 0.05, all linear projections; AdamW lr 2e-4, weight
decay 0.01, cosine schedule with 2 warm-up steps, grad-norm clip 1.0) on a Llama-3-8B-shaped model
with random weights, seed 0, on the baseline's rows (lognormal lengths, mean ~455, max 2048), and
prints one ``RESULT {json}`` line: real tokens/s (every token of a packed micro-batch is real),
median step time, peak GPU memory. Run it with ``torchrun --nproc-per-node N`` for data parallel.

Environment (defaults in brackets):
  NAME [fastpath]   label of the run          LAYERS [32]     decoder layers
  STEPS [14]        optimizer steps            WARM [4]        steps left out of the timing
  TOKENS [plan]     tokens per micro-batch     GC [auto]       checkpointing: auto | 0 | 1
  LIGER [auto]      Liger RMSNorm/SwiGLU/RoPE  CE [chunked]    chunked | liger (fused linear CE)
  LEAN [1]          LoRA in bf16 (no fp32 copies of activations)
  COMPILE [auto]    torch.compile each decoder layer (auto: as the plan says)
  QUANT [none]      4bit: NF4 base weights (QLoRA) via bitsandbytes
  PARITY [path]     replay the steps (rows) recorded by trl_parity.py and log every loss
  DATA [lognormal]  lognormal | markov (see common.make_rows)
  TINY [0]          1: a tiny model on CPU (smoke test of this script)
  OUT               folder for <NAME>.json
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import LLAMA3_8B, LORA_TARGETS, MAX_LEN, TINY, make_rows  # noqa: E402

from jobs import fastpath  # noqa: E402
from types import SimpleNamespace  # noqa: E402  (jobs.spec needs pydantic, absent on the GPU image)


def env(name, default):
    return os.environ.get(name, default)


def quantize_4bit(model, compute_dtype=torch.bfloat16):
    """Replace the decoder's nn.Linear layers by bitsandbytes NF4 layers (double quant), in place."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in layer.modules():
            for cname, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute_dtype, compress_statistics=True,
                                          quant_type="nf4", device="cpu")
                    q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False,
                                                 compress_statistics=True, quant_type="nf4")
                    q = q.to(child.weight.device)
                    setattr(parent, cname, q)
                    del child
        torch.cuda.empty_cache()
    model.is_loaded_in_4bit = True
    return model


def train(model, trainable, opt, cfg, dev, tokens, steps, world, rank, parity, data):
    """The timed loop; the baseline's rows, labels = input_ids (every token trained, as in TRL)."""
    from transformers import get_cosine_schedule_with_warmup

    if parity:
        with open(parity) as f:
            ref = json.load(f)
        order = ref["order"]
        steps = len(order)
        rows = make_rows(max(max(s) for s in order) + 1, cfg.vocab_size, ref.get("data", data))
        mbs_per_step = []
        for idx in order:
            sel = [rows[i] for i in idx]
            mb = fastpath.pack_rows(sel, sum(len(r["input_ids"]) for r in sel), seed=0, shuffle=False)
            mbs_per_step.append(mb)
    else:
        need = int(steps * world * tokens / 455 * 1.15) + 64
        rows = make_rows(need, cfg.vocab_size, data)
        mbs = fastpath.pack_rows(rows, tokens, seed=0)
        if len(mbs) < steps * world:
            raise SystemExit(f"only {len(mbs)} micro-batches for {steps} steps x {world} ranks")
        # each rank takes its own micro-batch of every step (all ranks know all of them)
        mbs_per_step = [mbs[s * world:(s + 1) * world] for s in range(steps)]

    sched = get_cosine_schedule_with_warmup(opt, 2, steps)
    flat = None
    if world > 1:
        flat = torch.zeros(sum(p.numel() for p in trainable), dtype=torch.float32, device=dev)

    times, losses, real = [], [], []
    t_start = time.perf_counter()
    for step in range(steps):
        group = mbs_per_step[step]
        n_global = sum(sum(1 for x in fastpath.shifted_targets(m["labels"], m["seq_lens"]) if x != -100)
                       for m in group)
        mine = group[rank::world] if parity else [group[rank]]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        step_loss = torch.zeros((), device=dev)
        for mb in mine:
            batch = fastpath.to_device(mb, dev)
            loss, n = fastpath.lm_loss(model, batch)
            (loss * (world / n_global)).backward()  # gradients are summed over ranks below
            step_loss += loss.detach()
        if world > 1:
            import torch.distributed as dist

            off = 0
            for p in trainable:
                k = p.numel()
                flat[off:off + k].copy_(p.grad.reshape(-1) if p.grad is not None else torch.zeros(k, device=dev))
                off += k
            dist.all_reduce(flat)
            flat.div_(world)
            off = 0
            for p in trainable:
                k = p.numel()
                if p.grad is None:
                    p.grad = torch.empty_like(p)
                p.grad.copy_(flat[off:off + k].view_as(p))
                off += k
            dist.all_reduce(step_loss)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        times.append(dt)
        losses.append(step_loss.item() / n_global)
        real.append(sum(sum(m["seq_lens"]) for m in group))
        if rank == 0 and (step < 3 or step % 20 == 0 or step == steps - 1):
            print(f"step {step} loss {losses[-1]:.4f} {dt:.3f}s tokens {real[-1]}", flush=True)
    wall = time.perf_counter() - t_start

    return times, losses, real, steps, wall, t_start


def main():
    name = env("NAME", "fastpath")
    tiny = env("TINY", "0") == "1"
    world = int(env("WORLD_SIZE", "1"))
    rank = int(env("RANK", "0"))
    local = int(env("LOCAL_RANK", "0"))
    if world > 1:
        import datetime

        import torch.distributed as dist

        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=5))
    dev = torch.device("cpu") if tiny else torch.device("cuda", local)
    layers = int(env("LAYERS", "2" if tiny else "32"))
    steps = int(env("STEPS", "14"))
    warm = int(env("WARM", "4"))
    quant = env("QUANT", "none")
    parity = env("PARITY", "")
    data = env("DATA", "markov" if parity else "lognormal")

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(TINY if tiny else LLAMA3_8B), num_hidden_layers=layers)
    torch.manual_seed(0)
    dtype = torch.float32 if tiny else torch.bfloat16
    t_build = time.perf_counter()
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    if quant == "4bit":
        quantize_4bit(model)
        n_params = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM", target_modules=LORA_TARGETS)
    model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]

    gc_env = env("GC", "auto")
    spec = SimpleNamespace(max_seq_length=MAX_LEN, precision="auto",
                           gradient_checkpointing={"auto": "auto", "0": False, "1": True}[gc_env])
    free = None
    if dev.type == "cuda":  # what was free before the model was loaded (the plan counts the weights)
        free = torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_allocated(dev)
    plan = fastpath.plan(cfg, spec, dev, quantization=quant, free_memory_bytes=free)
    if env("TOKENS", ""):
        plan.tokens_per_micro_batch = int(env("TOKENS", ""))
    liger = env("LIGER", "auto")
    if liger != "auto":
        plan.liger_kernels = liger == "1"
    plan.ce_impl = env("CE", "chunked")
    plan.lean_lora = env("LEAN", "1") == "1"
    if env("COMPILE", "auto") != "auto":
        plan.compile = env("COMPILE", "auto") == "1"
    fastpath.prepare_model(model, plan)
    model.train()

    tokens = plan.tokens_per_micro_batch
    opt = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.01, fused=dev.type == "cuda")
    ooms = []
    while True:
        try:
            times, losses, real, steps, wall, t_start = train(model, trainable, opt, cfg, dev, tokens, steps,
                                                             world, rank, parity, data)
            break
        except torch.OutOfMemoryError:
            if parity or len(ooms) >= 2 or dev.type != "cuda":
                raise
            ooms.append(tokens)
            opt.zero_grad(set_to_none=True)
            opt.state.clear()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            tokens = (tokens * 3 // 4) // 256 * 256
            print(f"OOM: retrying with {tokens} tokens per micro-batch", flush=True)

    t = times[warm:] if len(times) > warm else times
    r = real[warm:] if len(real) > warm else real
    tps = sum(r) / sum(t)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
    if world > 1:
        import torch.distributed as dist

        pk = torch.tensor([peak], device=dev)
        dist.all_reduce(pk, op=dist.ReduceOp.MAX)
        peak = pk.item()
    import peft
    import transformers

    res = dict(name=name, variant="fastpath", world=world, layers=layers, params=n_params,
               trainable=sum(p.numel() for p in trainable), steps=steps, warm=warm,
               tokens_per_micro_batch=tokens, gc=plan.gradient_checkpointing, liger=plan.liger_kernels,
               ce=plan.ce_impl, lean_lora=plan.lean_lora, compile=plan.compile, quant=quant, data=data,
               mean_tokens_per_step=round(sum(r) / len(r), 1), step_s_median=sorted(t)[len(t) // 2],
               tokens_per_s=round(tps, 1),
               mfu_4N=round(fastpath.mfu(tps, n_params, checkpointing=False), 4),
               peak_mem_gib=round(peak, 2), wall_s=round(wall, 1), build_s=round(t_start - t_build, 1),
               plan_notes=plan.notes, torch=torch.__version__, transformers=transformers.__version__,
               peft=peft.__version__, oom_retries=ooms, gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu")
    if parity:
        res["losses"] = losses
    if rank == 0:
        print("RESULT " + json.dumps({k: v for k, v in res.items() if k != "losses"}), flush=True)
        out = env("OUT", "")
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, f"{name}.json"), "w") as f:
                json.dump(res, f)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
