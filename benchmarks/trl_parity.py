"""Parity copy of ../shared/bench/trl_baseline.py (benchmarks/peer/ holds the verbatim one).

Changes: DATA=markov (learnable tokens, same lengths), logging every step, and a dump of each
step's rows and loss to $OUT/trl_parity_<variant>.json. Everything that trains is unchanged.

Peer baseline: plain TRL SFTTrainer + PEFT LoRA on a Llama-3-8B-shaped model (random weights).

Measures real (non-pad) tokens/s of training, peak GPU memory. Used as the performance anchor
that the project's trainer must beat on the same shapes and data distribution.
"""
import json, os, sys, time, math
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from tokenizers import Tokenizer, models
from datasets import Dataset
import uuid, datasets.fingerprint as _fp
# The GPU image's Python 3.12 + pyarrow 25 break datasets' dill-based fingerprinting
# (PicklingError on pyarrow MonthDayNano); fingerprints only name caches, so use random ones.
_fp.Hasher.hash = classmethod(lambda cls, value: uuid.uuid4().hex)
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

variant = sys.argv[1] if len(sys.argv) > 1 else "default"
steps = int(os.environ.get("STEPS", "30"))
warm = 5
bs = int(os.environ.get("BS", "8"))
max_len = 2048
layers = int(os.environ.get("LAYERS", "32"))

cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                  rope_theta=500000.0, tie_word_embeddings=False)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.config.use_cache = False
n_params = sum(p.numel() for p in model.parameters())

vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                              pad_token="t1", eos_token="t2", unk_token="t0")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import make_rows
n_ex = steps * bs * int(os.environ.get("GA", "1")) + 64
rows = make_rows(n_ex, cfg.vocab_size, os.environ.get("DATA", "markov"), max_len)
row_index = {tuple(r["input_ids"][:32]): i for i, r in enumerate(rows)}  # min length is 32
ds = Dataset.from_list(rows)
real_tokens_total = sum(len(r["input_ids"]) for r in rows)

class Timer(TrainerCallback):
    def __init__(self): self.t = []; self.t0 = None
    def on_step_begin(self, args, state, control, **kw):
        torch.cuda.synchronize(); self.t0 = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize(); self.t.append(time.perf_counter() - self.t0)

kw = dict(output_dir="/tmp/out", per_device_train_batch_size=bs, gradient_accumulation_steps=int(os.environ.get("GA", "1")),
          max_steps=steps, learning_rate=2e-4, weight_decay=0.01, bf16=True, logging_steps=1, save_strategy="no",
          report_to=[], max_length=max_len, gradient_checkpointing=os.environ.get("GC", "1") == "1", dataloader_num_workers=0,
          lr_scheduler_type="cosine", warmup_steps=2)
if variant in ("liger", "liger_packing"):
    kw["use_liger_kernel"] = True
if variant in ("packing", "liger_packing"):
    kw["packing"] = True
    kw["padding_free"] = True
args = SFTConfig(**kw)
lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
timer = Timer()
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora, callbacks=[timer])
# count real tokens per step via the collator
orig = trainer.data_collator
seen = []
order = []
def counting(features):
    order.append([row_index[tuple(list(f["input_ids"])[:32])] for f in features])
    seen.append(sum(len(f["input_ids"]) for f in features)); return orig(features)
trainer.data_collator = counting
trainer.train_dataset  # noqa
t_start = time.perf_counter()
trainer.train()
wall = time.perf_counter() - t_start
step_t = timer.t[warm:]
ga = int(os.environ.get("GA", "1"))
# tokens per optimizer step: seen is per micro-batch (may include prefetch); use the mean real tokens/example
mean_len = real_tokens_total / n_ex
tok_per_step = mean_len * bs * ga if variant not in ("packing", "liger_packing") else None
if tok_per_step is None:
    # packing: each micro-batch is one packed row of max_len per example slot
    tok_per_step = sum(seen[warm:warm + len(step_t)]) / max(1, len(step_t)) * 1.0 if seen else float("nan")
tps = tok_per_step / (sum(step_t) / len(step_t))
trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
res = dict(variant=variant, gc=os.environ.get("GC", "1"), layers=layers, params=n_params, trainable=trainable, bs=bs, ga=ga, steps=steps,
           mean_len=round(mean_len, 1), step_s_median=sorted(step_t)[len(step_t)//2], tokens_per_s=round(tps, 1),
           mfu_6N=round(6 * n_params * tps / 989e12, 4), peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
           wall_s=round(wall, 1), torch=torch.__version__, gpu=torch.cuda.get_device_name())
import transformers, trl, peft
res.update(transformers=transformers.__version__, trl=trl.__version__, peft=peft.__version__)
print("RESULT " + json.dumps(res), flush=True)
out = os.environ.get("OUT")
if out:
    res["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    res["order"] = order[:steps * ga]
    res["data"] = os.environ.get("DATA", "markov")
    with open(os.path.join(out, f"trl_parity_{variant}.json"), "w") as f: json.dump(res, f)
