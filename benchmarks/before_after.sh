#!/usr/bin/env bash
# Before/after on one GPU machine, in one call: each STAGE of benchmarks/gpu_acceptance.sh runs with the old
# code (.oldtree) then the new (.newtree), same machine, model, data and overrides. Prepare here (both folders
# kept out of git by .git/info/exclude), then run on the device with carry [.wheels, .gpu-assets, .oldtree,
# .newtree] (wheels and tokenizer: benchmarks/README.md):
#   mkdir .oldtree .newtree; for t in old:OLD_REF new:HEAD; do git archive ${t#*:} jobs benchmarks pyproject.toml \
#     | tar -x -C .${t%%:*}tree; done
#   bash benchmarks/before_after.sh bf16 qlora
# usage: bash benchmarks/before_after.sh STAGE...
#   STOP_AFTER (s, default 470): no run starts later than this into the call
set -u
ROOT=$PWD; T0=$(date +%s)
export ROWS=${ROWS:-700} MODELS=/dev/shm/accept-models TOK=$ROOT/.gpu-assets/tokenizer DEADLINE=${DEADLINE:-560}
export ACCEPT_OVERRIDES=${ACCEPT_OVERRIDES:-'{"merge": {"enabled": false}, "eval": {"enabled": false}, "training": {"max_steps": 40}}'}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .wheels/*.whl && touch /tmp/site/.done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for stage in "$@"; do
  for side in old new; do
    if [ $(( $(date +%s) - T0 )) -gt ${STOP_AFTER:-470} ]; then echo "SKIP $stage/$side (t=$(( $(date +%s) - T0 ))s)"; continue; fi
    (cd $ROOT/.${side}tree && RES=$ROOT/res/$side ACCEPT_WORK=/tmp/accept-$side bash benchmarks/gpu_acceptance.sh $stage 2>&1 \
       | grep -E "START|END|SKIP|Error|error|Traceback" | tail -8)
    tar czf $OUT/res.tgz res 2>/dev/null
  done
done
for side in old new; do
  python3 - "$side" <<'PY'
import json, sys, glob
side = sys.argv[1]
for f in sorted(glob.glob(f"res/{side}/job_*.json")):
    d = json.load(open(f))
    print(side, f.split("/")[-1], {k: d.get(k) for k in ("exit_code", "published", "tokens_per_second_steady", "tokens_per_second", "peak_gpu_gib", "steps")})
PY
done
echo "total $(( $(date +%s) - T0 ))s"
