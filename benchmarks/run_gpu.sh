#!/usr/bin/env bash
# One device call: wheels, GPU tests, our fast path and the peer TRL configurations side by side.
# Usage (repository root, on the GPU machine): bash benchmarks/run_gpu.sh STAGE...
#   tests     GPU unit tests of jobs.fastpath
#   pair      GPU0: our variants (FP_VARIANTS) | GPU1: TRL variants (TRL_VARIANTS), concurrently
#   dp        our fast path on 2 GPUs (torchrun, data parallel)
#   qlora     QLoRA 4-bit at sequence length 2048 (GPU0)
#   parity    TRL 'default' at LAYERS=2 for PSTEPS steps, then ours replaying the same batches
# Results: $OUT/results.tgz (JSON + logs) and a summary on stdout. DEADLINE (s, default 570)
# bounds the whole call: a run that would start too late is skipped.
set -u
START=$(date +%s)
DEADLINE=${DEADLINE:-570}
R=${RES:-/tmp/res}
mkdir -p "$R"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_DISABLE_PROGRESS_BARS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .wheels ] && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .wheels/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }

# run NAME NEED_S TIMEOUT_S GPU CMD...   (env for the run is passed before: VAR=.. run ...)
run() {
  local name=$1 need=$2 to=$3 gpu=$4; shift 4
  if [ "$(left)" -lt "$need" ]; then echo "SKIP $name (only $(left)s left)"; return; fi
  [ "$to" -gt "$(( $(left) - 5 ))" ] && to=$(( $(left) - 5 ))
  echo "START $name gpu=$gpu t=$(( $(date +%s) - START ))s"
  CUDA_VISIBLE_DEVICES=$gpu OUT=$R NAME=$name timeout "$to" "$@" > "$R/$name.log" 2>&1
  echo "END $name rc=$? t=$(( $(date +%s) - START ))s :: $(grep -h '^RESULT' "$R/$name.log" | cut -c1-400)"
  grep -h -E "Error|error:|Traceback" "$R/$name.log" | tail -3
}

fp_stream() {
  for v in ${FP_VARIANTS:-auto}; do
    case $v in
      auto)     STEPS=16 WARM=6 run fp_auto 120 240 0 python3 benchmarks/bench_trainer.py ;;
      eager)    COMPILE=0 run fp_eager 60 150 0 python3 benchmarks/bench_trainer.py ;;
      compliger) COMPILE=1 LIGER=1 STEPS=16 WARM=6 run fp_compile_liger 120 240 1 python3 benchmarks/bench_trainer.py ;;
      noliger)  COMPILE=0 LIGER=0 run fp_noliger 60 150 0 python3 benchmarks/bench_trainer.py ;;
      ligerce)  COMPILE=0 CE=liger run fp_ligerce 60 150 0 python3 benchmarks/bench_trainer.py ;;
      gc)       COMPILE=0 GC=1 TOKENS=16384 run fp_gc 60 150 0 python3 benchmarks/bench_trainer.py ;;
      t8k)      COMPILE=0 TOKENS=8192 STEPS=20 run fp_t8k 60 150 0 python3 benchmarks/bench_trainer.py ;;
      t16k)     TOKENS=16384 run fp_t16k 60 150 0 python3 benchmarks/bench_trainer.py ;;
      nolean)   COMPILE=0 LEAN=0 TOKENS=8192 STEPS=20 run fp_nolean 60 150 0 python3 benchmarks/bench_trainer.py ;;
      compile)  COMPILE=1 LIGER=0 STEPS=16 WARM=6 run fp_compile 120 240 0 python3 benchmarks/bench_trainer.py ;;
      qlora)    QUANT=4bit GC=1 TOKENS=2048 STEPS=12 run fp_qlora4_2048 90 200 0 python3 benchmarks/bench_trainer.py ;;
    esac
  done
}

trl_stream() {
  for v in ${TRL_VARIANTS:-liger}; do
    case $v in
      compliger) COMPILE=1 LIGER=1 STEPS=16 WARM=6 run fp_compile_liger 120 240 1 python3 benchmarks/bench_trainer.py ;;
      liger)         STEPS=16 GC=1 run trl_liger_gc1 90 200 1 python3 benchmarks/peer/trl_baseline.py liger ;;
      liger_packing) STEPS=12 GC=1 run trl_liger_packing_gc1 120 220 1 python3 benchmarks/peer/trl_baseline.py liger_packing ;;
      liger_nogc)    STEPS=16 GC=0 run trl_liger_gc0 90 200 1 python3 benchmarks/peer/trl_baseline.py liger ;;
      default)       STEPS=16 GC=1 run trl_default_gc1 90 200 1 python3 benchmarks/peer/trl_baseline.py default ;;
      replay)
        LAYERS=2 PARITY=${PARITY_REF} run fp_parity 60 200 1 python3 benchmarks/bench_trainer.py ;;
      parity)
        LAYERS=2 STEPS=${PSTEPS:-200} DATA=markov run trl_parity 90 240 1 python3 benchmarks/trl_parity.py default
        if [ -f "$R/trl_parity_default.json" ]; then
          LAYERS=2 PARITY=$R/trl_parity_default.json run fp_parity 60 200 1 python3 benchmarks/bench_trainer.py
        fi ;;
    esac
  done
}

for stage in "$@"; do
  case $stage in
    tests)
      echo "START tests t=$(( $(date +%s) - START ))s"
      timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fastpath_gpu.py > "$R/gpu_tests.log" 2>&1
      echo "END tests rc=$?"; tail -5 "$R/gpu_tests.log" ;;
    pair)
      fp_stream & p1=$!
      trl_stream & p2=$!
      wait $p1 $p2 ;;
    fp)  fp_stream ;;
    trl) trl_stream ;;
    dp)
      run fp_dp2 90 200 0,1 python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/bench_trainer.py ;;
  esac
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$R/gpu.txt" 2>&1
python3 -c "import torch,transformers,peft,sys;print(sys.version);print(torch.__version__,torch.version.cuda,transformers.__version__,peft.__version__)" >> "$R/gpu.txt" 2>&1
pip list 2>/dev/null | grep -i -E "^(trl|liger|datasets|bitsandbytes|accelerate) " >> "$R/gpu.txt"
PYTHONPATH=/tmp/site pip list --path /tmp/site 2>/dev/null | tail -n +3 >> "$R/gpu.txt"
python3 benchmarks/report.py "$R" > "$R/summary.md" 2>&1; cat "$R/summary.md"
[ -n "${OUT:-}" ] && tar czf "$OUT/results.tgz" -C "$R" . && cp "$R/summary.md" "$OUT/" 2>/dev/null
echo "total $(( $(date +%s) - START ))s"
