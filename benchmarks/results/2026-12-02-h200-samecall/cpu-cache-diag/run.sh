export PYTHONPATH=/work/main LORA_JOBS_COMPILE_CACHE_KEY=diag TORCH_LOGS=+torch._inductor.codecache,+torch._functorch._aot_autograd.autograd_cache
rm -rf store w1 w2 i1 i2
TORCHINDUCTOR_CACHE_DIR=/tmp/cj/i1 python force_compile.py run --spec spec.yaml --workdir /tmp/cj/w1 > cold.log 2>&1; echo cold $? >> status
TORCHINDUCTOR_CACHE_DIR=/tmp/cj/i2 python force_compile.py run --spec spec.yaml --workdir /tmp/cj/w2 > warm.log 2>&1; echo warm $? >> status
