#!/usr/bin/env bash
# GPU acceptance: the job itself, spec defaults, at user scale, beside the strongest peer.
# Usage (repository root, on the GPU machine): bash benchmarks/gpu_acceptance.sh STAGE...
#   bf16    python -m jobs run: Llama-3-8B shape, bf16 LoRA, 1,500 rows      (~5 min)
#   trl     the strongest peer in the same call: STEPS=14 GC=0 BS=4 liger_packing   (~2 min)
#   qlora   the job with quantization.mode: 4bit, max_seq_length 2048, 500 rows     (~3 min)
#   dpo     the job with training.method: dpo on the 8B shape, bf16 LoRA, $PAIRS pairs (default 400; acceptance.py
#           pairs: TRL's prompt/chosen/rejected format)
#   dpoq    the same with quantization.mode: 4bit;   orpo: the bf16 run with training.method: orpo
#   dpocap  the dpo stage again under training.gpu_memory_gib $CAP (default 64: below TRL DPOTrainer's 67.5 GiB peak
#           on the H100): throughput at no more memory than the peer
#   capsome the bf16 stage under training.gpu_memory_gib $CAP (default 40): the plan checkpoints only some layers
#   capall  the same with training.gradient_checkpointing: true (every layer, 8k-token micro-batches: the plan
#           before e1ac5bc), to compare in the same call
#   long8k  bf16, training.max_seq_length 8192, $LONGROWS (default 48) rows of ~8,100 tokens, 12 steps (issue 34 item 4;
#           12 steps or one epoch, whichever ends first: 48 rows make 3 steps of 16)
#   long16kq  4-bit, max_seq_length 16384, $LONGROWS rows of ~16,200 tokens, 12 steps; base_model.max_context 16384
#           (the Llama-3-8B shape's config holds 8,192 positions; Llama 3.1's 131,072)
#   trldpo  the preference peer in the same call: TRL's DPOTrainer + PEFT LoRA on the same model folder, pairs and
#           tokenizer (benchmarks/peer/trl_dpo.py), GC=0 BS=4;   trldpoq: the same on the 8B in NF4, GC=1
#   qwen    the job on the Qwen2.5-7B shape, bf16 LoRA, 800 rows                    (~3 min)
#   fp8     the bf16 job again with training.fp8: on (torchao float8 for the frozen projections)   (~5 min)
#   parity  FP8 against bf16 through the job on a Llama-3.2-1B shape, 255 steps (1,350 rows x 3 epochs)
#           (~7.5 min: 193 s + 227 s in call 10)
#   warm    after parity (same machine, store kept): the bf16 parity run again with another seed and 30
#           steps, its first step from the compile cache that run saved (~2 min)
#   warm8b  after bf16 (same machine, store kept): the 8B bf16 run again (same run name and shapes, seed 7,
#           20 steps), its first step from the compile cache that bf16 saved, under torch.profiler for
#           optimizer steps $PROFILE_STEPS (default 16:3; benchmarks/profile_job.py) (~2.5 min)
#   rerun8b after bf16: the same run again (seed 7, 12 steps), unprofiled, its first step from bf16's compile cache
#           in an empty inductor folder: the warm start as a retry sees it (~2 min)
#   prof8b  the 8B bf16 job, 12 steps, under torch.profiler for steps $PROFILE_STEPS (default 6:3, clear of the
#           validations), with torch.compile's phase times and counters up to then (~2.5 min)
#   warmprof8b  after prof8b: the same run again (seed 7), first step from prof8b's compile cache, same profile
#   trlq    TRL's QLoRA in the same call as qlora: liger_packing, the 8B model loaded in NF4, STEPS=14 BS=4,
#           GC=1 (checkpointing, QLoRA's usual memory) and GC=0 (its fastest) (~3 min)
#   cachediag  the compile cache: a 1B bf16 run of 3 steps, then the same run again (same seed), then with seed 7,
#           each with the FX graph and AOTAutograd cache keys' inputs logged (TORCH_LOGS), to diff (~6 min)
#   fp8tests  pytest tests/gpu -k fp8 (the FP8 projection against bf16, the FP8 job and its warm rerun)
#   tests   pytest tests/gpu (fp16 loss scaling, the out-of-memory back-off, QLoRA restore/merge, FP8)
# Models and data are made on first use (random weights; SmolLM2's tokenizer from
# .gpu-assets/tokenizer). Results: $RES (default benchmarks/results/<date>-h200-job) gets
# job_*.json, the job logs, trl_*.json and summary.json; a copy goes to $OUT when set.
# DEADLINE (s, default 560) bounds the call: a stage that would start too late is skipped.
# ROWS (default 1500): rows of the 8B bf16/fp8/warm8b stages' data. ACCEPT_OVERRIDES (JSON, e.g.
# '{"merge": {"enabled": false}}') is added to every job's spec (benchmarks/acceptance.py).
set -u
START=$(date +%s)
DEADLINE=${DEADLINE:-560}
RES=${RES:-benchmarks/results/$(date +%Y-%m-%d)-h200-job}
# the 8B and 7B base models (31 GB) live in memory when /dev/shm has room, else on disk
if [ -z "${MODELS:-}" ]; then
  MODELS=/tmp/accept-models
  shm_free=$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
  [ "${shm_free:-0}" -ge 45 ] && MODELS=/dev/shm/accept-models
fi
export ACCEPT_WORK=${ACCEPT_WORK:-/tmp/accept}
TOK=${TOK:-.gpu-assets/tokenizer}
mkdir -p "$RES" "$MODELS" "$ACCEPT_WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_DISABLE_PROGRESS_BARS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .wheels ] && [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .wheels/*.whl \
    && touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
A="python3 benchmarks/acceptance.py"

need() {  # need NAME SECONDS: skip the stage when too little of the call is left
  if [ "$(left)" -lt "$2" ]; then echo "SKIP $1 (only $(left)s left)"; return 1; fi
  echo "START $1 t=$(( $(date +%s) - START ))s"
}
data() {  # data ROWS -> path of a data file with that many rows
  local f="$ACCEPT_WORK/data-$1.jsonl"
  [ -f "$f" ] || $A data "$f" "$TOK" "$1" >&2
  echo "$f"
}
pairs() {  # pairs N -> path of a preference-pairs file with that many pairs
  local f="$ACCEPT_WORK/pairs-$1.jsonl"
  [ -f "$f" ] || $A pairs "$f" "$TOK" "$1" >&2
  echo "$f"
}
longdata() {  # longdata ROWS TOKENS -> path of a data file whose every row has ~TOKENS tokens
  local f="$ACCEPT_WORK/long-$1-$2.jsonl"
  [ -f "$f" ] || $A longdata "$f" "$TOK" "$1" "$2" >&2
  echo "$f"
}
models() {  # models [NAMES]: comma-separated, default the 8B and 7B shapes
  local names=${1:-llama3-8b,qwen2.5-7b} n missing=
  for n in ${names//,/ }; do [ -f "$MODELS/$n/config.json" ] || missing=1; done
  [ -z "$missing" ] || $A models "$MODELS" "$TOK" "$names"
}
ROWS=${ROWS:-1500}
FP8='{"training": {"fp8": "on"}}'
# what makes a compile-cache lookup hit or miss: the FX graph and AOTAutograd cache keys' inputs, per graph
CACHE_LOGS=+torch._inductor.codecache,+torch._functorch._aot_autograd.autograd_cache
PARITY='"epochs": 3, "early_stopping_patience": null'

for stage in "$@"; do
  case $stage in
    bf16)  need bf16 240 && models llama3-8b && $A job bf16 "$MODELS/llama3-8b" "$(data $ROWS)" "$RES" ;;
    trl)   need trl 120 && timeout $(( $(left) - 5 )) $A trl "$RES" ;;
    capsome) need capsome 200 && models llama3-8b && $A job capsome "$MODELS/llama3-8b" "$(data $ROWS)" "$RES" \
             "{\"training\": {\"gpu_memory_gib\": ${CAP:-40}}}" ;;
    capall) need capall 200 && models llama3-8b && $A job capall "$MODELS/llama3-8b" "$(data $ROWS)" "$RES" \
             "{\"training\": {\"gpu_memory_gib\": ${CAP:-40}, \"gradient_checkpointing\": true}}" ;;
    qlora) need qlora 150 && models llama3-8b && $A job qlora "$MODELS/llama3-8b" "$(data 500)" "$RES" \
             '{"quantization": {"mode": "4bit"}, "training": {"max_seq_length": 2048}}' ;;
    qloraeager) need qloraeager 150 && models llama3-8b && $A job qlora_eager "$MODELS/llama3-8b" "$(data 500)" "$RES" \
             '{"quantization": {"mode": "4bit"}, "training": {"max_seq_length": 2048, "compile": "off"}}' ;;
    dpo)   need dpo 200 && models llama3-8b && $A job dpo "$MODELS/llama3-8b" "$(pairs ${PAIRS:-400})" "$RES" \
             '{"training": {"method": "dpo"}}' ;;
    dpoq)  need dpoq 200 && models llama3-8b && $A job dpoq "$MODELS/llama3-8b" "$(pairs ${PAIRS:-400})" "$RES" \
             '{"training": {"method": "dpo"}, "quantization": {"mode": "4bit"}}' ;;
    dpocap) need dpocap 200 && models llama3-8b && $A job dpocap "$MODELS/llama3-8b" "$(pairs ${PAIRS:-400})" "$RES" \
             "{\"training\": {\"method\": \"dpo\", \"gpu_memory_gib\": ${CAP:-64}}}" ;;
    long8k) need long8k 200 && models llama3-8b && $A job long8k "$MODELS/llama3-8b" "$(longdata ${LONGROWS:-48} 8100)" \
             "$RES" '{"training": {"max_seq_length": 8192, "max_steps": 12}, "eval": {"enabled": false}}' ;;
    long16kq) need long16kq 200 && models llama3-8b && $A job long16kq "$MODELS/llama3-8b" \
             "$(longdata ${LONGROWS:-48} 16200)" "$RES" \
             '{"base_model": {"max_context": 16384}, "quantization": {"mode": "4bit"}, "training": {"max_seq_length": 16384, "max_steps": 12}, "eval": {"enabled": false}}' ;;
    orpo)  need orpo 200 && models llama3-8b && $A job orpo "$MODELS/llama3-8b" "$(pairs ${PAIRS:-400})" "$RES" \
             '{"training": {"method": "orpo"}}' ;;
    trldpo) need trldpo 150 && models llama3-8b && d=$(pairs ${PAIRS:-400}) \
             && timeout $(( $(left) - 5 )) $A trldpo "$RES" gc0 "$MODELS/llama3-8b" "$d" "$TOK" "" 0 ;;
    trldpoq) need trldpoq 150 && models llama3-8b && d=$(pairs ${PAIRS:-400}) \
             && timeout $(( $(left) - 5 )) $A trldpo "$RES" qlora_gc1 "$MODELS/llama3-8b" "$d" "$TOK" 4bit 1 ;;
    qwen)  need qwen 150 && models && $A job qwen "$MODELS/qwen2.5-7b" "$(data 800)" "$RES" ;;
    fp8)   need fp8 240 && models llama3-8b && $A job fp8 "$MODELS/llama3-8b" "$(data $ROWS)" "$RES" "$FP8" ;;
    warm8b) if [ ! -d "$ACCEPT_WORK/store/bf16/compile-cache" ]; then echo "SKIP warm8b (no bf16 run in this machine's store)"
            else need warm8b 150 && models llama3-8b && ACCEPT_PROFILE=${PROFILE_STEPS:-16:3} $A job bf16_warm \
             "$MODELS/llama3-8b" "$(data $ROWS)" "$RES" '{"training": {"seed": 7, "max_steps": 20}}' bf16; fi ;;
    rerun8b) if [ ! -d "$ACCEPT_WORK/store/bf16/compile-cache" ]; then echo "SKIP rerun8b (no bf16 run in this machine's store)"
            else need rerun8b 120 && models llama3-8b && $A job bf16_rerun "$MODELS/llama3-8b" "$(data $ROWS)" "$RES" \
             '{"training": {"seed": 7, "max_steps": 12}}' bf16; fi ;;
    prof8b) need prof8b 150 && models llama3-8b && ACCEPT_PROFILE=${PROFILE_STEPS:-6:3} $A job prof8b \
             "$MODELS/llama3-8b" "$(data $ROWS)" "$RES" '{"training": {"max_steps": 12}}' ;;
    warmprof8b) if [ ! -d "$ACCEPT_WORK/store/prof8b/compile-cache" ]; then echo "SKIP warmprof8b (no prof8b run)"
             else need warmprof8b 150 && ACCEPT_PROFILE=${PROFILE_STEPS:-6:3} $A job prof8b_warm "$MODELS/llama3-8b" \
             "$(data $ROWS)" "$RES" '{"training": {"seed": 7, "max_steps": 12}}' prof8b; fi ;;
    trlq)  need trlq 100 && models llama3-8b && timeout $(( $(left) - 5 )) $A trl "$RES" 4bit "$MODELS/llama3-8b" 1
           need trlq_gc0 80 && timeout $(( $(left) - 5 )) $A trl "$RES" 4bit "$MODELS/llama3-8b" 0 ;;
    parity) need parity 360 && models llama3-1b && d=$(data 1500) \
             && $A job parity_bf16 "$MODELS/llama3-1b" "$d" "$RES" "{\"training\": {$PARITY}}" \
             && $A job parity_fp8 "$MODELS/llama3-1b" "$d" "$RES" "{\"training\": {$PARITY, \"fp8\": \"on\"}}" ;;
    warm)  need warm 150 && models llama3-1b && $A job parity_bf16_warm "$MODELS/llama3-1b" "$(data 1500)" "$RES" \
             "{\"training\": {$PARITY, \"seed\": 7, \"max_steps\": 30}}" parity_bf16 ;;
    cachediag) need cachediag 300 && models llama3-1b && d=$(data 1500) && D='{"merge": {"enabled": false}, "training": {"max_steps": 3' \
             && TORCH_LOGS=$CACHE_LOGS $A job diag "$MODELS/llama3-1b" "$d" "$RES" "$D}}" \
             && TORCH_LOGS=$CACHE_LOGS $A job diag_same "$MODELS/llama3-1b" "$d" "$RES" "$D}}" diag \
             && TORCH_LOGS=$CACHE_LOGS $A job diag_seed7 "$MODELS/llama3-1b" "$d" "$RES" "$D, \"seed\": 7}}" diag ;;
    fp8tests) need fp8tests 60 && LORA_GPU_TOKENIZER=$TOK timeout $(( $(left) - 5 )) python3 -m pytest -q -s \
             -p no:cacheprovider tests/gpu -k fp8 > "$RES/gpu_tests_fp8.log" 2>&1; echo "END fp8tests rc=$?"
             tail -5 "$RES/gpu_tests_fp8.log" ;;
    tests) need tests 150 && LORA_GPU_TOKENIZER=$TOK timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider \
             tests/gpu > "$RES/gpu_tests.log" 2>&1; echo "END tests rc=$?"; tail -5 "$RES/gpu_tests.log" ;;
  esac
  echo "END $stage t=$(( $(date +%s) - START ))s"
  # what is done so far comes back even if a later stage runs past the device call's limit (call 10 lost it so)
  # (one archive: at most 8 files come back from a call)
  [ -n "${OUT:-}" ] && tar czf "$OUT/partial.tgz" -C "$RES" . 2>/dev/null
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$RES/gpu.txt" 2>&1
python3 -c "import torch,transformers,peft,sys;print(sys.version);print(torch.__version__,torch.version.cuda,transformers.__version__,peft.__version__)" >> "$RES/gpu.txt" 2>&1
pip list --path /tmp/site 2>/dev/null | tail -n +3 >> "$RES/gpu.txt"
$A summary "$RES" "$RES/summary.json" > /dev/null
cat "$RES/summary.json"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/results.tgz" -C "$RES" . && cp "$RES/summary.json" "$OUT/"
fi
echo "total $(( $(date +%s) - START ))s"
