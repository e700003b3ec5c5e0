"""Peer baseline for preference tuning: TRL's DPOTrainer + PEFT LoRA on the job's own model folder and pairs file.

    BASE=<model folder> DATA=<pairs .jsonl> TOK=<tokenizer folder> [QUANT=4bit] [GC=0|1] [BS=4] [GA=1]
    [PRE=0|1] [LIGER=0|1] [STEPS=14] OUT=<folder> python benchmarks/peer/trl_dpo.py NAME

The same model (its weights as the job loads them), the same pairs (TRL's standard format: prompt, chosen,
rejected strings) and the same tokenizer as the job; LoRA r=16 on the seven projections, beta 0.1, max length
2048, bf16. TRL 1.16's DPO has no padding-free path (it says "temporarily unavailable" and pads), so each step's
real tokens are counted from the tokenized pairs: 2 x prompt + chosen + rejected, padding excluded. The reference
is the base with the adapter disabled (TRL's default with a PEFT model), computed every step unless PRE=1
(``precompute_ref_log_probs``: one pass before training, its time measured and reported apart).

Prints ``RESULT {json}`` and writes ``$OUT/trl_dpo_<NAME>.json``: steady tokens/s (median step after 3 warm-up
steps), pairs/s, the reference precompute's seconds, peak GPU memory.
"""
import json
import os
import sys
import time
import uuid

import datasets.fingerprint as _fp
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

# The GPU image's Python 3.12 + pyarrow break datasets' dill-based fingerprinting; fingerprints only name caches.
_fp.Hasher.hash = classmethod(lambda cls, value: uuid.uuid4().hex)

name = sys.argv[1] if len(sys.argv) > 1 else "default"
env = os.environ.get
steps, warm = int(env("STEPS", "14")), 3
bs, ga = int(env("BS", "4")), int(env("GA", "1"))
quant = env("QUANT", "")

tok = AutoTokenizer.from_pretrained(env("TOK"))
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
kw = {"dtype": torch.bfloat16, "device_map": {"": 0}, "attn_implementation": env("ATTN", "sdpa")}
if quant == "4bit":
    from transformers import BitsAndBytesConfig
    kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(env("BASE"), **kw)
model.config.use_cache = False

rows = [json.loads(line) for line in open(env("DATA")) if line.strip()]
need = (steps + 1) * bs * ga
rows = (rows * (need // len(rows) + 1))[:need]
ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])


class Timer(TrainerCallback):
    def __init__(self):
        self.t, self.t0 = [], None

    def on_step_begin(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.t.append(time.perf_counter() - self.t0)


args = DPOConfig(output_dir="/tmp/trl-dpo-out", per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                 max_steps=steps, learning_rate=5e-6, beta=0.1, bf16=True, max_length=2048, logging_steps=5,
                 save_strategy="no", report_to=[], gradient_checkpointing=env("GC", "1") == "1",
                 dataloader_num_workers=0, precompute_ref_log_probs=env("PRE", "0") == "1",
                 use_liger_kernel=env("LIGER", "0") == "1", lr_scheduler_type="cosine", warmup_steps=2)
lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
timer = Timer()
trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora,
                     callbacks=[timer])
tokd = trainer.train_dataset
per_pair = [2 * len(p) + len(c) + len(r) for p, c, r in zip(tokd["prompt_ids"], tokd["chosen_ids"],
                                                             tokd["rejected_ids"])]
torch.cuda.reset_peak_memory_stats()
t_start = time.perf_counter()
trainer.train()
wall = time.perf_counter() - t_start
step_t = timer.t[warm:]
median = sorted(step_t)[len(step_t) // 2]
pairs_per_step = bs * ga
tok_per_step = sum(per_pair) / len(per_pair) * pairs_per_step
pre_s = wall - sum(timer.t) if args.precompute_ref_log_probs else 0.0
import peft  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402

res = dict(name=name, quant=quant or None, gc=env("GC", "1"), bs=bs, ga=ga, steps=steps,
           precompute_ref=args.precompute_ref_log_probs, liger=args.use_liger_kernel,
           mean_tokens_per_pair=round(sum(per_pair) / len(per_pair), 1), step_s_median=round(median, 3),
           tokens_per_s=round(tok_per_step / median, 1), pairs_per_s=round(pairs_per_step / median, 2),
           ref_precompute_s=round(pre_s, 1), peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
           wall_s=round(wall, 1), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
           transformers=transformers.__version__, trl=trl.__version__, peft=peft.__version__)
print("RESULT " + json.dumps(res), flush=True)
if env("OUT"):
    with open(os.path.join(env("OUT"), f"trl_dpo_{name}.json"), "w") as f:
        json.dump(res, f)
