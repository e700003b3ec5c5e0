"""The memory planner: dtype, attention, checkpointing, compile, FP8, FSDP2 and tokens per micro-batch for
one model on one device, from its config, the spec's training section and the GPU memory free.

Pure arithmetic over the model config (no model is loaded): :func:`plan` decides,
:func:`jobs.trainer.fastpath.prepare_model` applies.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from jobs.formatting import size
from jobs.trainer.modelio import torch_dtype

from .attention import ATTN_IMPL, varlen_available
from .compiling import bnb_4bit_compiles
from .fp8 import fp8_recipe, fp8_support, refuse_fp8
from .loss import CE_CHUNK, CE_CHUNKS

log = logging.getLogger(__name__)


@dataclass
class Plan:
    attn_implementation: str
    dtype: torch.dtype
    gradient_checkpointing: bool
    tokens_per_micro_batch: int
    compile: bool
    notes: list[str] = field(default_factory=list)
    liger_kernels: bool = False      # Liger RMSNorm/SwiGLU/RoPE kernels on the decoder
    memory_budget_bytes: int | None = None  # GPU memory the plan fits into (None on CPU)
    fp8: bool = False                # FP8 GEMMs for the frozen base projections (see apply_fp8)
    fsdp: bool = False               # FSDP2: the base sharded over every rank (jobs.trainer.distributed.shard_model)
    #: with gradient_checkpointing: how many decoder layers, from the first, recompute their forward in the
    #: backward (None: every layer); the others keep their activations
    checkpoint_layers: int | None = None
    #: tokens per chunk of the loss's cross-entropy over the lm_head (:data:`jobs.trainer.fastpath.loss.CE_CHUNK`,
    #: smaller where its fp32 logits do not fit the budget beside one micro-batch); prepare_model sets it on the base
    ce_chunk: int = CE_CHUNK


def _cfg(model_config, name, default=None):
    if isinstance(model_config, dict):
        return model_config.get(name, default)
    return getattr(model_config, name, default)


def estimate_param_count(model_config) -> int:
    """Parameters of a decoder-only transformer from its config (a dict or a config object), lm_head included."""
    h = int(_cfg(model_config, "hidden_size", 0) or 0)
    inter = int(_cfg(model_config, "intermediate_size", 4 * h) or 4 * h)
    layers = int(_cfg(model_config, "num_hidden_layers", 0) or 0)
    vocab = int(_cfg(model_config, "vocab_size", 0) or 0)
    heads = int(_cfg(model_config, "num_attention_heads", 1) or 1)
    kv = int(_cfg(model_config, "num_key_value_heads", heads) or heads)
    hd = int(_cfg(model_config, "head_dim", None) or (h // max(1, heads)))
    attn = h * heads * hd * 2 + h * kv * hd * 2
    mlp = 3 * h * inter
    tied = bool(_cfg(model_config, "tie_word_embeddings", False))
    return layers * (attn + mlp + 2 * h) + vocab * h * (1 if tied else 2) + h


def activation_bytes_per_token(model_config, *, checkpointing: bool, dtype_bytes: int = 2,
                               liger: bool = False, checkpoint_layers: int | None = None) -> float:
    """Bytes of saved activations per token of a micro-batch (whole model), LoRA on all linears.

    No checkpointing: every layer keeps its inputs of the projections, the dropout copies for the
    LoRA branches, attention inputs/outputs and the MLP intermediates: about 17 hidden-sized and
    7 intermediate-sized tensors a layer with the eager RMSNorm/SwiGLU, 13 and 3.5 with Liger's
    kernels (which keep no fp32 copies); see benchmarks/README.md for the measured values.
    Checkpointing: one hidden-sized tensor a layer plus one layer's full set during recompute;
    ``checkpoint_layers`` k of the layers: k hidden-sized tensors, the other layers' full sets, and one
    layer's full set during recompute.
    """
    h = int(_cfg(model_config, "hidden_size", 0) or 0)
    inter = int(_cfg(model_config, "intermediate_size", 4 * h) or 4 * h)
    layers = int(_cfg(model_config, "num_hidden_layers", 1) or 1)
    ch, ci = (LIGER_HIDDEN_COEF, LIGER_INTER_COEF) if liger else (ACT_HIDDEN_COEF, ACT_INTER_COEF)
    per_layer = (ch * h + ci * inter) * dtype_bytes
    if checkpointing:
        k = layers if checkpoint_layers is None else max(0, min(layers, checkpoint_layers))
        return k * h * dtype_bytes * 1.0 + (layers - k) * per_layer + (per_layer if k else 0)
    return layers * per_layer


#: calibration of activation_bytes_per_token (see benchmarks/README.md)
ACT_HIDDEN_COEF = 17.0
ACT_INTER_COEF = 7.3
LIGER_HIDDEN_COEF = 13.0
LIGER_INTER_COEF = 4.1
#: model types whose decoder layers were measured to compile (dynamic shapes, varlen attention)
COMPILE_MODEL_TYPES = {"llama"}
#: above this micro-batch size the GEMMs are saturated; more tokens only cost memory (8B on an
#: H200: 15.2k tokens/s at 69 GiB with 8k-token micro-batches, 15.0k at 121 GiB with 16k)
MAX_TOKENS_PER_MICRO_BATCH = 8192
#: checkpointing stays off while a micro-batch of this many tokens (or two rows, if more) fits without it: it
#: recomputes every layer's forward (~+1/3 of the work), while 4k-token micro-batches still fill an 8B's GEMMs.
#: An 8B DPO run capped at 64 GiB on an H100 took checkpointing with 8k tokens: 10.1k tok/s at 20 GiB, against
#: 14.7k uncapped (benchmarks/results/2026-12-07-h100-cap)
MIN_TOKENS_WITHOUT_CHECKPOINTING = 4096
#: bytes kept free for the allocator, CUDA context and fragmentation (plus the loss chunk, in plan)
HEADROOM_BYTES = 2 * 2**30
#: the same for quantised runs, planned into a small budget (12 GiB): the 8B QLoRA plan with 2 GiB kept free
#: took 3,584-token micro-batches and peaked at 9.0 GiB of its 12 (benchmarks/README.md)
QUANTIZED_HEADROOM_BYTES = 1 * 2**30
#: what ``training.gpu_memory_gib: auto`` means for quantised runs: the guide's "4-12 GB of VRAM"
QUANTIZED_MEMORY_GIB = 12.0


def memory_budget_bytes(training, quantization: str, free_memory_bytes: int) -> int:
    """GPU memory a run may plan for: the spec's ``gpu_memory_gib``, else all free memory for 16-bit
    LoRA and :data:`QUANTIZED_MEMORY_GIB` for QLoRA / 8-bit (so it also runs on a small card or a
    shared one); never more than is free."""
    want = getattr(training, "gpu_memory_gib", "auto")
    if want == "auto":
        want = QUANTIZED_MEMORY_GIB if quantization != "none" else None
    if want is None:
        return int(free_memory_bytes)
    return int(min(free_memory_bytes, float(want) * 2**30))


def plan(model_config, training, device: torch.device | str, *, free_memory_bytes: int | None = None,
         quantization: str = "none", world_size: int = 1) -> Plan:
    """Choose the fast path for this model on this device.

    * dtype: bf16 where the GPU supports it, else fp16; fp32 on CPU. ``training.precision`` wins
      when it is not "auto".
    * attention: :data:`ATTN_IMPL` always (packed rows need per-example attention); it runs the
      flash varlen kernel on CUDA (Ampere+) and SDPA per example elsewhere.
    * checkpointing and tokens per micro-batch: from the free memory, the weights and the
      calibrated activation cost per token: no checkpointing when a micro-batch of at least
      ``max(MIN_TOKENS_WITHOUT_CHECKPOINTING, 2 * unit)`` tokens fits without it (``unit``: a row of
      ``max_seq_length``, or a preference pair's two sides); else, for a 16-bit base, checkpointing of the
      fewest decoder layers that let such a micro-batch fit (:attr:`Plan.checkpoint_layers`); else
      checkpointing of every layer with the largest micro-batch that fits; never more than
      :data:`MAX_TOKENS_PER_MICRO_BATCH`.
      ``training.gradient_checkpointing`` true/false is obeyed.
    * the loss's chunk (:attr:`Plan.ce_chunk`): the budget keeps one chunk of fp32 logits and their gradient
      free (``2 * chunk * vocab * 4`` bytes, 1.96 GiB for a 128k vocabulary at 2,048 tokens); where that leaves
      no room for one ``unit``-token micro-batch with checkpointing, the first of :data:`CE_CHUNKS` that does
      (the loss then runs more, smaller chunks; same values). Not where ``gpu_memory_gib: auto`` would raise a
      quantised run's 12 GiB instead.
    * compile: each decoder layer with ``torch.compile(dynamic=True)`` on CUDA for model types in
      :data:`COMPILE_MODEL_TYPES`, 16-bit or 4-bit (bitsandbytes' NF4 ops trace since 0.46), unless
      ``training.compile: off`` (+8% over Liger's kernels on the 8B benchmark); otherwise Liger's
      RMSNorm/SwiGLU/RoPE kernels when importable.
    * ``free_memory_bytes`` is the memory free BEFORE the model is loaded (default: free now); the
      plan fits into :func:`memory_budget_bytes` of it.
    * FSDP2 (``training.fsdp``, ``world_size`` training processes): auto shards the base when there
      is more than one process and the weights, the LoRA state, headroom and one max-length sequence
      (with checkpointing) do not fit the budget; on shards whenever there is more than one. A
      sharded plan counts weights and LoRA state / world_size plus the all-gathered layers FSDP
      holds at a time, and leaves out torch.compile and FP8. When the weights alone do not fit and
      the base is not sharded, planning fails (:class:`jobs.errors.OutOfMemory`) naming the fix.
    """
    device = torch.device(device)
    notes: list[str] = []
    fp8_req = getattr(training, "fp8", "off")
    if fp8_req == "on" and device.type != "cuda":
        refuse_fp8("this run has no GPU")
    max_seq = int(getattr(training, "max_seq_length", 1024))
    ctx = _cfg(model_config, "max_position_embeddings", None)
    if ctx:
        max_seq = min(max_seq, int(ctx))
    # what one micro-batch must hold whole: a row, or a preference pair's two sides (chosen, then rejected)
    sides = 2 if getattr(training, "method", "sft") in ("dpo", "orpo") else 1
    unit = max_seq * sides
    precision = getattr(training, "precision", "auto")
    gc_req = getattr(training, "gradient_checkpointing", "auto")
    fsdp_req = getattr(training, "fsdp", "auto")
    if fsdp_req == "on" and world_size <= 1:
        notes.append("fsdp: on has no effect with one training process: the whole base on one device")
        log.warning("training.fsdp: on has no effect with one training process (set resources.gpus above 1)")
    if device.type != "cuda":
        dtype = torch_dtype(precision) if precision in ("bf16", "fp16") else torch.float32
        notes.append("CPU: attention is SDPA per example; no compile; fp32 unless asked otherwise")
        tokens = max(max_seq, 2048)
        # no memory model on a CPU: auto never shards there, on does (how FSDP2 is tested without GPUs)
        sharded = fsdp_req == "on" and world_size > 1 and quantization == "none"
        if sharded:
            notes.append(_fsdp_note(world_size))
        return Plan(ATTN_IMPL, dtype, gc_req is True, tokens, False, notes, fsdp=sharded)

    try:
        bf16_ok = torch.cuda.is_bf16_supported()
    except Exception:  # noqa: BLE001 - planning for a GPU from a machine without one (tests)
        bf16_ok = True
    if precision == "auto":
        dtype = torch.bfloat16 if bf16_ok else torch.float16
    else:
        dtype = torch_dtype(precision)
    fp8 = False
    if fp8_req != "off":
        ok, why = fp8_support(device)
        if ok and quantization != "none":
            ok, why = False, f"quantization {quantization} replaces the projections"
        if ok and dtype != torch.bfloat16:
            ok, why = False, f"precision is {str(dtype).removeprefix('torch.')}, FP8 training wants bf16"
        if not ok and fp8_req == "on":
            refuse_fp8(why)
        fp8 = ok
        notes.append(f"FP8 ({fp8_recipe()} scaling, torchao) for the frozen projections' forward and input-gradient "
                     "GEMMs; LoRA, attention, norms and the lm_head in bf16" if ok else f"FP8 off: {why}")
    if varlen_available(device) and dtype != torch.float32:
        notes.append("attention: flash varlen kernel (torch.nn.attention.varlen) over packed rows")
    else:
        notes.append("attention: SDPA per example (no varlen kernel for this device/dtype)")
    model_type = str(_cfg(model_config, "model_type", "") or "")
    compile_req = getattr(training, "compile", "auto")
    compile_ok = (compile_req != "off" and model_type in COMPILE_MODEL_TYPES and varlen_available(device)
                  and dtype != torch.float32 and (quantization == "none"
                                                  or (quantization == "4bit" and bnb_4bit_compiles())))
    liger = False
    if compile_req == "off":
        notes.append("torch.compile off (training.compile: off)")
    if compile_ok:
        notes.append("torch.compile of each decoder layer (fuses norms, SwiGLU, RoPE, dropout"
                     + (", and bitsandbytes' 4-bit dequantization into the same graph" if quantization == "4bit" else "")
                     + "; the first steps pay ~1-2 minutes of compilation)")
    else:
        try:
            import liger_kernel  # noqa: F401
            liger = True
            notes.append("Liger kernels importable: RMSNorm/SwiGLU/RoPE fused")
        except Exception:  # noqa: BLE001
            pass
    if free_memory_bytes is None:
        free_memory_bytes, _total = torch.cuda.mem_get_info(device)
    budget_total = memory_budget_bytes(training, quantization, free_memory_bytes)
    n_params = estimate_param_count(model_config)
    wbytes = {"4bit": 0.56, "8bit": 1.05}.get(quantization, torch.finfo(dtype).bits / 8)
    weights = n_params * wbytes
    if quantization != "none":  # embeddings and lm_head stay in 16 bit
        h = int(_cfg(model_config, "hidden_size", 0) or 0)
        vocab = int(_cfg(model_config, "vocab_size", 0) or 0)
        weights += 2 * vocab * h * (2 - wbytes)
    lora_state = 0.006 * n_params * 16  # ~0.5% of the params trainable at r=16: fp32 weight+grad+2 moments
    vocab = int(_cfg(model_config, "vocab_size", 0) or 0)
    slack = QUANTIZED_HEADROOM_BYTES if quantization != "none" else HEADROOM_BYTES

    def headroom_for(chunk: int) -> int:  # allocator slack + one chunk of fp32 logits (and its gradient)
        return slack + 2 * chunk * vocab * 4

    headroom = headroom_for(CE_CHUNK)
    budget = budget_total - weights - lora_state - headroom
    dbytes = torch.finfo(dtype).bits // 8
    fused = liger or compile_ok  # both keep no fp32 copies in the norms and one MLP intermediate less
    per_tok_nogc = activation_bytes_per_token(model_config, checkpointing=False, dtype_bytes=dbytes, liger=fused)
    per_tok_gc = activation_bytes_per_token(model_config, checkpointing=True, dtype_bytes=dbytes, liger=fused)
    fits_one_gpu = budget - unit * per_tok_gc >= 0
    sharded = (world_size > 1 and quantization == "none"
               and (fsdp_req == "on" or (fsdp_req == "auto" and not fits_one_gpu)))
    if sharded:
        # Each rank keeps 1/world of the weights and of the LoRA state (sharded DTensors, sharded AdamW
        # moments); FSDP2 all-gathers one decoder layer while the previous one computes (two layers at a
        # time) and keeps the root's embeddings and lm_head gathered from the loss's forward to its backward.
        n_layers = max(1, int(_cfg(model_config, "num_hidden_layers", 1) or 1))
        h = int(_cfg(model_config, "hidden_size", 0) or 0)
        root = vocab * h * (1 if bool(_cfg(model_config, "tie_word_embeddings", False)) else 2) + h
        layer = (n_params - root) / n_layers
        gathered = (2 * layer + root) * wbytes * (1 - 1 / world_size)
        weights = weights / world_size
        lora_state = lora_state / world_size
        if compile_ok:
            compile_ok = False
            notes.append("torch.compile off: the layers are FSDP2-sharded (their all-gather hooks stay eager)")
            fused = liger
        if fp8 and fp8_req == "on":
            refuse_fp8("the base is FSDP2-sharded (training.fsdp), and FP8 is not wired into its all-gather: "
                         "set training.fp8: off, or training.fsdp: off if the base fits one GPU")
        if fp8:
            fp8 = False
            notes.append("FP8 off: FSDP2 would all-gather the bf16 weights; torchao's float8 all-gather is not wired in")
        per_tok_nogc = activation_bytes_per_token(model_config, checkpointing=False, dtype_bytes=dbytes, liger=fused)
        per_tok_gc = activation_bytes_per_token(model_config, checkpointing=True, dtype_bytes=dbytes, liger=fused)
        notes.append(_fsdp_note(world_size) + (" (the weights do not fit one GPU)" if not fits_one_gpu else ""))
    else:
        gathered = 0.0
    # the loss's chunk: the default, unless its logits leave no room for one unit-token micro-batch with
    # checkpointing; then the first smaller one that does (the smallest, to refuse with, if none does). Not where
    # auto raises a quantised run's 12 GiB floor to what the default needs (below): that keeps the default.
    raises_floor = (quantization != "none" and not sharded and getattr(training, "gpu_memory_gib", "auto") == "auto"
                    and weights + lora_state + headroom + unit * per_tok_gc <= free_memory_bytes)
    ce_chunk = CE_CHUNK
    for ce_chunk in (CE_CHUNKS if not raises_floor else (CE_CHUNK,)):
        if budget_total - weights - lora_state - gathered - headroom_for(ce_chunk) - unit * per_tok_gc >= 0:
            break
    headroom = headroom_for(ce_chunk)
    budget = budget_total - weights - lora_state - headroom - gathered
    if ce_chunk < CE_CHUNK:
        notes.append(f"loss computed {ce_chunk} tokens at a time ({CE_CHUNK} does not fit the memory budget)")
    if budget <= 0:
        if world_size > 1 and not sharded:
            fix = ("set training.fsdp: auto or on to shard it over the run's "
                   f"{world_size} processes" if quantization == "none" else
                   "use a GPU with more memory (a quantised base is not sharded)")
        elif sharded:
            fix = (f"even 1/{world_size} of it does not fit: raise resources.gpus (or resources.nodes), or raise "
                   "training.gpu_memory_gib if it is set below the card's memory")
        need_gib = math.ceil((weights + lora_state + headroom + unit * per_tok_gc) / 2**30)
        if not sharded and world_size == 1 and quantization == "none":
            fix = ("raise resources.gpus above 1 (training.fsdp: auto then shards the base over the GPUs), use "
                   "quantization.mode: 4bit, or a GPU with more memory")
        elif not sharded and world_size == 1:  # a quantised base: neither sharding nor 4-bit is a way out
            fix = (f"raise training.gpu_memory_gib to {need_gib} or more (with training.max_seq_length "
                   f"{max_seq}), lower training.max_seq_length, or use a GPU with more memory"
                   + (", or quantization.mode: 4bit" if quantization == "8bit" else ""))
        if (quantization != "none" and getattr(training, "gpu_memory_gib", "auto") == "auto"
                and need_gib * 2**30 <= free_memory_bytes):
            fix = (f"training.gpu_memory_gib: auto plans {quantization} runs for {QUANTIZED_MEMORY_GIB:g} GiB; "
                   f"{free_memory_bytes / 2**30:.0f} GiB are free: set training.gpu_memory_gib to {need_gib} or more"
                   + (", or use quantization.mode: 4bit" if quantization == "8bit" else "")
                   + (" (a quantised base is not sharded)" if world_size > 1 else ""))
        from jobs.errors import OutOfMemory

        raise OutOfMemory(f"the base model does not fit the GPU memory budget: weights ~{size(weights)} "
                          f"+ LoRA state ~{size(lora_state)} + headroom {size(headroom)} "
                          f"> {size(budget_total)} planned for per GPU"
                          + (f" ({world_size} processes, {'sharded' if sharded else 'each with the whole base'})"
                             if world_size > 1 else " (one training process)"), hint=fix)
    want = max(MIN_TOKENS_WITHOUT_CHECKPOINTING, 2 * unit)

    def fit(per_tok: float, cap: bool = True) -> int:
        t = int(budget // per_tok) if budget > 0 else 0
        return min(MAX_TOKENS_PER_MICRO_BATCH, (t // 256) * 256) if cap else t

    if gc_req is True:
        gc = True
    elif gc_req is False:
        gc = False
    else:
        gc = fit(per_tok_nogc) < min(want, MAX_TOKENS_PER_MICRO_BATCH)
    n_layers = max(1, int(_cfg(model_config, "num_hidden_layers", 1) or 1))
    layers_ckpt = None
    if gc and gc_req == "auto" and quantization == "none" and not sharded:
        # checkpoint only as many layers as a micro-batch of `want` tokens needs: each one left out saves its
        # recomputed forward. (Quantised bases keep every layer checkpointed and the largest micro-batch: their
        # weights are dequantised again for every micro-batch.)
        target = max(min(want, MAX_TOKENS_PER_MICRO_BATCH), unit)
        for k in range(1, n_layers):
            per_tok_k = activation_bytes_per_token(model_config, checkpointing=True, dtype_bytes=dbytes, liger=fused,
                                                   checkpoint_layers=k)
            if fit(per_tok_k, cap=False) >= target:
                layers_ckpt, per_tok_gc = k, per_tok_k
                break
    tokens = fit(per_tok_gc if gc else per_tok_nogc)
    if not gc and gc_req != False and fit(per_tok_nogc, cap=False) < unit:  # noqa: E712
        gc = True
        tokens = fit(per_tok_gc)
    need = weights + lora_state + headroom + unit * per_tok_gc
    if (fit(per_tok_gc if gc else per_tok_nogc, cap=False) < unit and quantization != "none" and not sharded
            and getattr(training, "gpu_memory_gib", "auto") == "auto" and need <= free_memory_bytes):
        # auto's 12 GiB for a quantised run is a floor, not a wall: a long max_seq_length gets what it needs
        notes.append(f"gpu_memory_gib auto: {QUANTIZED_MEMORY_GIB:g} GiB do not hold one {unit}-token micro-batch; "
                     f"planning for {size(need)}")
        budget_total, budget, gc = int(need), unit * per_tok_gc, gc_req is not False
        tokens = fit(per_tok_gc if gc else per_tok_nogc)
    if fit(per_tok_gc if gc else per_tok_nogc, cap=False) < unit:
        refuse_long(unit, sides, max_seq, budget_total, budget, per_tok_gc if gc else per_tok_nogc, gc, gc_req,
                    quantization, training, free_memory_bytes)
    tokens = max(tokens, unit)
    checkpointing = "off" if not gc else "on" if layers_ckpt is None else f"on for {layers_ckpt} of {n_layers} layers"
    notes.append(f"free {size(free_memory_bytes)}, planning for {size(budget_total)}, "
                 f"weights ~{size(weights)}, activations ~{(per_tok_gc if gc else per_tok_nogc) / 2**20:.2f} MiB/token "
                 f"-> {tokens} tokens per micro-batch, checkpointing {checkpointing}")
    return Plan(ATTN_IMPL, dtype, gc, tokens, compile_ok, notes, liger_kernels=liger,
                memory_budget_bytes=budget_total, fp8=fp8, fsdp=sharded, checkpoint_layers=layers_ckpt,
                ce_chunk=ce_chunk)


def refuse_long(unit: int, sides: int, max_seq: int, budget_total: float, left: float, per_tok: float, gc: bool,
                gc_req, quantization: str, training, free_memory_bytes: int) -> None:
    """Raise :class:`jobs.errors.OutOfMemory` before loading: one micro-batch must hold a whole row (a pair's two
    sides), and the activations of ``unit`` tokens do not fit what the weights leave of the budget. Names the
    longest ``max_seq_length`` that fits and the other ways out."""
    from jobs.errors import OutOfMemory

    fits = max(0, int(max(left, 0) // per_tok) // sides // 256 * 256)
    what = f"a pair of two {max_seq}-token sides" if sides == 2 else f"a {max_seq}-token row"
    ways = [f"lower training.max_seq_length to {fits} or less" if fits >= 32 else "lower training.max_seq_length"]
    if not gc and gc_req is False:
        ways.insert(0, "set training.gradient_checkpointing: auto (activations are then ~"
                    "1/10 as large)")
    if getattr(training, "gpu_memory_gib", "auto") != "auto" or quantization != "none":
        if budget_total < free_memory_bytes:
            ways.append(f"raise training.gpu_memory_gib (it plans for {size(budget_total)} of {size(free_memory_bytes)} "
                        "free)")
    if quantization == "none":
        ways.append("quantization.mode: 4bit")
    ways.append("a GPU with more memory")
    raise OutOfMemory(f"training.max_seq_length {max_seq} does not fit: one micro-batch holds {what} whole, whose "
                      f"activations ({'with' if gc else 'without'} checkpointing, ~{per_tok / 2**20:.2f} MiB a token) "
                      f"need ~{size(unit * per_tok)}, and the weights leave ~{size(max(left, 0))} of the "
                      f"{size(budget_total)} planned for", hint=", ".join(ways[:-1]) + " or " + ways[-1])


def whole_base_fits(model_config, p: Plan) -> bool:
    """Whether the whole (unsharded) base fits the plan's GPU memory budget for generations: what rank 0 needs
    at the end of an FSDP2 run (evaluation, the adapter's files, the merge), where one GPU no longer has the
    other ranks' shards. True on CPU (no budget)."""
    if p.memory_budget_bytes is None:
        return True
    weights = estimate_param_count(model_config) * torch.finfo(p.dtype).bits / 8
    return weights + HEADROOM_BYTES <= p.memory_budget_bytes


def _fsdp_note(world_size: int) -> str:
    return (f"FSDP2: the frozen base and the LoRA weights sharded over {world_size} processes (fully_shard per "
            "decoder layer and at the root); gradients reduce-scattered")
