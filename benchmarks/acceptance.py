"""GPU acceptance: the job itself (``python -m jobs run``, spec defaults) at user scale, and the peer.

Every number here comes from the job's own run: its metadata.json (steady-state and overall
tokens/s, examples and tokens per step, peak GPU memory and wall time per stage) and its
published version, verified against its manifest. No training loop of its own.

Subcommands (run by benchmarks/gpu_acceptance.sh, one device call):

  models DIR TOKENIZER [NAMES]  random-weight Llama-3-8B, Qwen2.5-7B (default) and Llama-3.2-1B
                               (llama3-1b) shapes, bf16 safetensors; NAMES: comma-separated
  data FILE TOKENIZER N        N instruction/output rows, token lengths as the peer's (lognormal,
                               median ~350, capped at 2048), text that passes the golden rules
  job NAME MODEL DATA RES [JSON] [RUN]  write a spec (defaults + JSON overrides), run the job, record it;
                               RUN (default NAME) is the spec's name: a second job with the same RUN is
                               the same run again (its store is kept: checkpoints, compile cache, v2)
  trl RES                      the strongest peer: STEPS=14 GC=0 BS=4 trl_baseline.py liger_packing
  summary RES OUTFILE          summary.json from the records in RES
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
LLAMA32_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                  num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                  max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=True)
QWEN25_7B = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False)


SHAPES = {"llama3-8b": LLAMA3_8B, "qwen2.5-7b": QWEN25_7B, "llama3-1b": LLAMA32_1B}


def cmd_models(root: str, tokenizer: str, names: str = "llama3-8b,qwen2.5-7b") -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    for name in names.split(","):
        shape = SHAPES[name]
        out = Path(root) / name
        if (out / "config.json").is_file():
            print(f"{out} exists", flush=True)
            continue
        t0 = time.perf_counter()
        shape = dict(shape)
        cfg = AutoConfig.for_model(shape.pop("model_type"), **shape)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        tmp = out.with_name(out.name + ".part")
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
        tok.save_pretrained(tmp)
        tmp.rename(out)
        n = sum(p.numel() for p in model.parameters())
        print(f"{out}: {n / 1e9:.2f}B parameters in {time.perf_counter() - t0:.0f}s", flush=True)
        del model
        torch.cuda.empty_cache()


_NOUNS = ("router", "switch", "firewall", "access point", "modem", "bridge", "mesh node", "cable", "antenna",
          "port", "channel", "band", "guest network", "VPN tunnel", "DNS server", "DHCP range", "firmware",
          "admin page", "status light", "reset button", "parental filter", "QoS rule", "port forward")
_VERBS = ("open", "check", "restart", "update", "disable", "enable", "rename", "move", "test", "replace",
          "select", "confirm", "save", "clear", "lock", "unplug", "reconnect", "wait for")
_TAILS = ("before you continue", "from the settings page", "on the main screen", "for every device",
          "after the lights settle", "under the advanced tab", "in the mobile app", "once a week",
          "when the signal drops", "with the latest release", "for the second band", "at the back panel")


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_VERBS).capitalize(), "the", rng.choice(_NOUNS), rng.choice(_TAILS)]
    if rng.random() < 0.5:
        words += ["and", rng.choice(_VERBS), "the", rng.choice(_NOUNS)]
    if rng.random() < 0.3:
        words += ["within", str(rng.randint(2, 90)), "seconds"]
    return " ".join(words) + "."


def cmd_data(path: str, tokenizer: str, n: int) -> None:
    """Rows whose token lengths follow the peer's lognormal (median ~350, mean ~455, max 2048)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    rng = random.Random(0)
    rows = []
    for i in range(n):
        target = min(2048, max(32, int(math.exp(rng.gauss(math.log(350), 0.8)))))
        q = f"Ticket {i}: how do I {rng.choice(_VERBS)} the {rng.choice(_NOUNS)} {rng.choice(_TAILS)}?"
        budget = target - len(tok(q)["input_ids"]) - 12  # the chat template's own tokens
        parts: list[str] = []
        while True:
            s = _sentence(rng)
            if parts and len(tok(" ".join(parts + [s]))["input_ids"]) > budget:
                break
            parts.append(s)
            if len(parts) > 400:
                break
        rows.append({"instruction": q, "output": " ".join(parts)})
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    lens = [len(tok(r["instruction"] + " " + r["output"])["input_ids"]) for r in rows]
    print(f"{path}: {n} rows, mean {sum(lens) / n:.0f} tokens, max {max(lens)}", flush=True)


def cmd_longdata(path: str, tokenizer: str, n: int, tokens: int) -> None:
    """``n`` rows of ~``tokens`` tokens each (question + answer, chat template's own tokens left out): the long-context
    runs, whose every row fills ``max_seq_length``. Sentences are added in blocks and measured once a block."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    rng = random.Random(2)
    rows, lens = [], []
    for i in range(n):
        q = f"Ticket {i}: summarise the log of the {rng.choice(_NOUNS)} {rng.choice(_TAILS)}."
        budget = tokens - len(tok(q)["input_ids"]) - 16
        parts: list[str] = []
        have = 0
        while True:  # each block measured alone (a sum, not the whole text again: 16k tokens a row)
            block = " ".join(_sentence(rng) for _ in range(64))
            n_block = len(tok(" " + block)["input_ids"])
            if have + n_block > budget:
                break
            parts.append(block)
            have += n_block
        rows.append({"instruction": q, "output": " ".join(parts)})
        lens.append(len(tok(q + " " + rows[-1]["output"])["input_ids"]))
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{path}: {n} rows, mean {sum(lens) / n:.0f} tokens, max {max(lens)}", flush=True)


def _answer(rng: random.Random, tok, target: int) -> str:
    parts: list[str] = []
    while len(parts) < 400:
        s = _sentence(rng)
        if parts and len(tok(" ".join(parts + [s]))["input_ids"]) > target:
            break
        parts.append(s)
    return " ".join(parts)


def cmd_pairs(path: str, tokenizer: str, n: int) -> None:
    """Preference pairs in TRL's standard format (prompt, chosen, rejected strings): a ticket question, a chosen
    answer of steps, and a rejected one that opens by brushing the user off; each side's length lognormal (median
    ~300 tokens, at most 900), so a pair fits 2,048 tokens either way."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    rng = random.Random(1)
    rows = []
    for i in range(n):
        q = f"Ticket {i}: how do I {rng.choice(_VERBS)} the {rng.choice(_NOUNS)} {rng.choice(_TAILS)}?"
        sizes = [min(900, max(24, int(math.exp(rng.gauss(math.log(300), 0.6))))) for _ in range(2)]
        chosen = "Here is how. " + _answer(rng, tok, sizes[0])
        rejected = "Not my problem, but fine. " + _answer(rng, tok, sizes[1])
        rows.append({"prompt": q, "chosen": chosen, "rejected": rejected})
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    lens = [sum(len(tok(r[k])["input_ids"]) for k in ("prompt", "chosen", "rejected")) for r in rows]
    print(f"{path}: {n} pairs, mean {sum(lens) / n:.0f} tokens (prompt + chosen + rejected), max {max(lens)}",
          flush=True)


def _spec(name: str, model: str, data: str, store: str, overrides: dict) -> dict:
    spec = {"name": name, "base_model": {"uri": model}, "dataset": {"train": data}, "output": store}
    for key, value in overrides.items():  # {"quantization": {"mode": "4bit"}} and the like
        spec.setdefault(key, {}).update(value) if isinstance(value, dict) else spec.__setitem__(key, value)
    return spec


def cmd_job(name: str, model: str, data: str, res: str, overrides_json: str = "{}", run: str = "") -> int:
    """Run the job as the container does and record what it published and measured.

    Each job gets an empty inductor cache folder, so a first step is warm only through what the job
    itself restores (its compile cache in the store), never through an earlier job's local files."""
    import yaml

    from jobs.publish import existing_versions, verify_version
    from jobs.storage import LocalStore

    res_dir = Path(res)
    res_dir.mkdir(parents=True, exist_ok=True)
    base = Path(os.environ.get("ACCEPT_WORK", "/tmp/accept"))
    run = (run or name).replace("_", "-")  # a run name is lowercase letters, digits and '-'
    store_dir, work, inductor = base / "store", base / f"work-{name}", base / f"inductor-{name}"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(inductor, ignore_errors=True)
    if run == name.replace("_", "-"):  # a new run, not the same run again
        shutil.rmtree(store_dir / run, ignore_errors=True)
    overrides = json.loads(overrides_json)
    # every stage of the call: $ACCEPT_OVERRIDES, e.g. {"merge": {"enabled": false}} (the merge was proved
    # in earlier calls; skipping it leaves more of a 10-minute call for training)
    for key, value in json.loads(os.environ.get("ACCEPT_OVERRIDES") or "{}").items():
        overrides.setdefault(key, {}).update(value) if isinstance(value, dict) else overrides.__setitem__(key, value)
    spec = _spec(run, model, data, str(store_dir), overrides)
    spec_path = res_dir / f"spec_{name}.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    log_path = res_dir / f"job_{name}.log"
    t0 = time.perf_counter()
    # ACCEPT_PROFILE=FIRST:N: the same job under torch.profiler for optimizer steps FIRST..FIRST+N-1
    # (benchmarks/profile_job.py; the summary goes to RES/profile_NAME/)
    prof = os.environ.get("ACCEPT_PROFILE")
    entry = ([str(REPO / "benchmarks" / "profile_job.py")] if prof else ["-m", "jobs"])
    # ACCEPT_CPROFILE=1: the job under cProfile (main thread; where the first step's compile time goes on
    # the host, e.g. a warm start); RES/cprofile_NAME.txt gets the top functions by cumulative time
    cprof = res_dir / f"cprofile_{name}.prof" if os.environ.get("ACCEPT_CPROFILE") else None
    if cprof and not prof:
        entry = ["-m", "cProfile", "-o", str(cprof), "-m", "jobs"]
    prof_env = {"PROFILE_STEPS": prof, "PROFILE_OUT": str(res_dir / f"profile_{name}")} if prof else {}
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, *entry, "run", "--spec", str(spec_path), "--workdir", str(work)],
                              stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": f"{os.environ.get('PYTHONPATH', '')}:{REPO}",
                                   "TERMINATION_MESSAGE_PATH": str(res_dir / f"job_{name}.termination"),
                                   "TORCHINDUCTOR_CACHE_DIR": str(inductor), **prof_env,
                                   "LORA_JOBS_COMPILE_CACHE_KEY": os.environ.get("LORA_JOBS_COMPILE_CACHE_KEY",
                                                                                 "acceptance")})
    wall = time.perf_counter() - t0
    if cprof and cprof.is_file():
        import io
        import pstats

        text = io.StringIO()
        stats = pstats.Stats(str(cprof), stream=text)
        stats.sort_stats("cumulative").print_stats(70)
        stats.sort_stats("tottime").print_stats(30)
        (res_dir / f"cprofile_{name}.txt").write_text(text.getvalue())
        cprof.unlink()
    record = {"name": name, "exit_code": proc.returncode, "wall_seconds": round(wall, 1), "spec": spec,
              "published": False, "log_timing": log_timing(log_path.read_text())}
    if prof and (res_dir / f"profile_{name}" / "profile_summary.json").is_file():
        record["profile"] = json.loads((res_dir / f"profile_{name}" / "profile_summary.json").read_text())
    store = LocalStore(str(store_dir))
    if proc.returncode == 0:
        v = f"v{max(existing_versions(store, run))}"
        meta = json.loads(store.get_bytes(f"{run}/{v}/metadata.json"))
        report = json.loads(store.get_bytes(f"{run}/{v}/eval_report.json"))
        problems = verify_version(store, run, v)
        t = meta["training"]
        record.update({
            "published": not problems and store.exists(f"{run}/{v}/_COMPLETE"), "version": v,
            "verify_problems": problems[:5],
            "fp8": t.get("fp8"), "fp8_recipe": t.get("fp8_recipe"), "first_step_seconds": t.get("first_step_seconds"),
            "compile_cache": t.get("compile_cache"),
            "history": [[h["step"], h["loss"]] for h in report["training"]["history"]],
            "evals": [[e["step"], e["val_loss"]] for e in report["training"].get("evals", [])],
            "tokens_per_second_steady": t["tokens_per_second_steady"], "tokens_per_second": t["tokens_per_second"],
            "examples_per_step": t["examples_per_step"], "tokens_per_step": t["tokens_per_step"],
            "tokens_per_micro_batch": t["tokens_per_micro_batch"], "steps": t["steps"],
            "published_step": t["published_step"], "oom_backoffs": t["oom_backoffs"],
            "gradient_checkpointing": t["gradient_checkpointing"], "loss_scaling": t["loss_scaling"],
            "plan": t["plan"], "stages": meta["stages"],
            "peak_gpu_gib": max((s["peak_gpu_gib"] or 0) for s in meta["stages"].values()),
            "train_peak_gpu_gib": meta["stages"]["train"]["peak_gpu_gib"],
            "val_loss_before": meta["metrics"]["val_loss_before"], "val_loss_after": meta["metrics"]["val_loss_after"],
            "train_loss_first": meta["metrics"]["train_loss_first"],
            "train_loss_last": meta["metrics"]["train_loss_last"],
            "merge": report.get("merge"), "merged_published": store.exists(f"{run}/{v}/merged/config.json"),
            "checklist": report.get("checklist"),
        })
        # the merged copy (16 GB) is verified above; free the disk for the next run
        shutil.rmtree(store_dir / run / v / "merged", ignore_errors=True)
    else:
        tail = log_path.read_text().splitlines()[-15:]
        record["log_tail"] = tail
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(inductor, ignore_errors=True)
    (res_dir / f"job_{name}.json").write_text(json.dumps(record, indent=1))
    short = {k: record.get(k) for k in ("exit_code", "published", "tokens_per_second_steady", "tokens_per_second",
                                         "peak_gpu_gib", "examples_per_step", "steps", "first_step_seconds",
                                         "wall_seconds")}
    print(f"RESULT job {name} {json.dumps(short)}", flush=True)
    return proc.returncode


_TS = re.compile(r"^(\d\d):(\d\d):(\d\d) ")


def log_timing(text: str) -> dict:
    """Seconds between landmarks of a job log (1 s resolution): the model on the GPU (the plan line, right
    after the weights are loaded) and the start of the train stage, each to the end of optimizer step 1."""
    marks: dict[str, int] = {}
    for line in text.splitlines():
        m = _TS.match(line)
        if not m:
            continue
        t = int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])
        for key, needle in (("model_loaded", "INFO  device "), ("train_stage", "── train"),
                            ("first_step", "INFO  step 1/"), ("cache_restored", "restored from")):
            if needle in line and key not in marks:
                marks[key] = t
    out = {}
    if "first_step" in marks:
        for key in ("model_loaded", "train_stage"):
            if key in marks:
                out[f"{key}_to_first_step_s"] = (marks["first_step"] - marks[key]) % 86400
    out["compile_cache_restored"] = "cache_restored" in marks
    return out


def cmd_trl(res: str, quant: str = "", base: str = "", gc: str = "0") -> int:
    """The peer: ``STEPS=14 GC=0 BS=4 trl_baseline.py liger_packing`` (its strongest bf16 configuration);
    with QUANT (``4bit``) and BASE (a model folder), TRL's QLoRA: the same variant on BASE loaded in NF4
    by bitsandbytes, GC as given (1: checkpointing, the usual QLoRA memory; 0: its fastest)."""
    res_dir = Path(res)
    res_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # its own JSON copy would be one more file back
    env.update(STEPS="14", GC=gc, BS="4")
    config = f"STEPS=14 GC={gc} BS=4 liger_packing"
    tag = "liger_packing"
    if quant:
        env.update(QUANT=quant, BASE=base)
        config = f"QUANT={quant} BASE=<{Path(base).name}> {config}"
        tag = f"qlora_gc{gc}"
    log_path = res_dir / f"trl_{tag}.log"
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "peer" / "trl_baseline.py"), "liger_packing"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    m = re.findall(r"^RESULT (.*)$", log_path.read_text(), flags=re.M)
    record = {"exit_code": proc.returncode, "config": config, **(json.loads(m[-1]) if m else {})}
    if not m:
        record["log_tail"] = log_path.read_text().splitlines()[-15:]
    (res_dir / f"trl_{tag}.json").write_text(json.dumps(record, indent=1))
    print(f"RESULT trl {tag} {json.dumps(record)[:400]}", flush=True)
    return proc.returncode


def cmd_trldpo(res: str, name: str, base: str, data: str, tokenizer: str, quant: str = "", gc: str = "1",
               pre: str = "0") -> int:
    """The preference peer: TRL's DPOTrainer + PEFT LoRA (benchmarks/peer/trl_dpo.py) on the job's model folder,
    pairs and tokenizer; writes ``trl_dpo_<name>.json``."""
    res_dir = Path(res)
    res_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(STEPS="14", BS="4", GC=gc, PRE=pre, BASE=base, DATA=data, TOK=tokenizer, QUANT=quant, OUT=str(res_dir))
    log_path = res_dir / f"trl_dpo_{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "peer" / "trl_dpo.py"), name],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    m = re.findall(r"^RESULT (.*)$", log_path.read_text(), flags=re.M)
    if not m:
        (res_dir / f"trl_dpo_{name}.json").write_text(json.dumps(
            {"exit_code": proc.returncode, "log_tail": log_path.read_text().splitlines()[-15:]}, indent=1))
    print(f"RESULT trl_dpo {name} rc={proc.returncode} {m[-1][:400] if m else ''}", flush=True)
    return proc.returncode


def cmd_summary(res: str, outfile: str) -> None:
    res_dir = Path(res)

    def rec(name):
        p = res_dir / name
        return json.loads(p.read_text()) if p.is_file() else {}

    bf16, qlora, qwen = rec("job_bf16.json"), rec("job_qlora.json"), rec("job_qwen.json")
    trl = rec("trl_liger_packing.json")
    trl_tps = trl.get("tokens_per_s")
    s = {
        "job_bf16_tokens_per_s": bf16.get("tokens_per_second_steady"),
        "job_bf16_tokens_per_s_with_warmup": bf16.get("tokens_per_second"),
        "job_bf16_peak_gib": bf16.get("peak_gpu_gib"),
        "job_bf16_published": bool(bf16.get("published")),
        "job_bf16_merge_check": (bf16.get("merge") or {}).get("ok"),
        "job_qlora_tokens_per_s": qlora.get("tokens_per_second_steady"),
        "job_qlora_peak_gib": qlora.get("peak_gpu_gib"),
        "job_qlora_published": bool(qlora.get("published")),
        "job_qwen_tokens_per_s": qwen.get("tokens_per_second_steady"),
        "job_qwen_peak_gib": qwen.get("peak_gpu_gib"),
        "job_qwen_published": bool(qwen.get("published")),
        "trl_best_tokens_per_s": trl_tps,
        "trl_best_peak_gib": trl.get("peak_mem_gib"),
        "trl_best_config": trl.get("config"),
        "ratio_vs_trl_best": (round(bf16["tokens_per_second_steady"] / trl_tps, 2)
                              if trl_tps and bf16.get("tokens_per_second_steady") else None),
        "examples_per_step": bf16.get("examples_per_step"),
        "stages_bf16": bf16.get("stages"), "stages_qlora": qlora.get("stages"), "stages_qwen": qwen.get("stages"),
    }
    fp8 = rec("job_fp8.json")
    if fp8:
        s["job_fp8"] = {k: fp8.get(k) for k in ("exit_code", "published", "tokens_per_second_steady", "tokens_per_second",
                                               "peak_gpu_gib", "train_peak_gpu_gib", "fp8_recipe", "first_step_seconds",
                                               "steps", "tokens_per_step", "stages")}
        s["job_fp8"]["merge_check"] = (fp8.get("merge") or {}).get("ok")
        if trl_tps and fp8.get("tokens_per_second_steady"):
            s["ratio_fp8_vs_trl_best"] = round(fp8["tokens_per_second_steady"] / trl_tps, 2)
    s.update(_parity(rec("job_parity_bf16.json"), rec("job_parity_fp8.json"), rec("job_parity_bf16_warm.json")))
    if bf16 or fp8:
        s["first_step_cold"] = {n: {"first_step_seconds": r.get("first_step_seconds"), **(r.get("log_timing") or {})}
                                for n, r in (("bf16", bf16), ("fp8", fp8)) if r}
    warm8 = rec("job_bf16_warm.json")
    if warm8:  # the 8B bf16 run again (same run name, same shapes, another seed): first step from its cache
        s["warm_start_8b"] = {
            "first_step_seconds_cold": bf16.get("first_step_seconds"),
            "first_step_seconds_warm": warm8.get("first_step_seconds"),
            "log_timing_cold": bf16.get("log_timing"), "log_timing_warm": warm8.get("log_timing"),
            "compile_cache": warm8.get("compile_cache"), "published": warm8.get("published"),
            "version": warm8.get("version"), "exit_code": warm8.get("exit_code"),
            "tokens_per_second_steady_under_profiler": warm8.get("tokens_per_second_steady"),
            "steps": warm8.get("steps"), "peak_gpu_gib": warm8.get("peak_gpu_gib"),
            "meets_60s": (warm8.get("first_step_seconds") or 1e9) <= 60}
        if warm8.get("profile"):
            s["profile_8b_bf16"] = {k: warm8["profile"].get(k) for k in (
                "window", "steps", "tokens", "wall_s", "tokens_per_s_under_profiler", "gpu_busy_fraction_of_wall",
                "gpu_idle_s", "share_of_kernel_time", "gaps_between_kernels")}
    trlq = {gc: rec(f"trl_qlora_gc{gc}.json") for gc in ("1", "0")}
    if qlora or any(trlq.values()):
        q = qlora.get("tokens_per_second_steady")
        s["qlora"] = {"job_tokens_per_s": q, "job_peak_gib": qlora.get("peak_gpu_gib"),
                      "job_train_peak_gib": qlora.get("train_peak_gpu_gib"),
                      "job_gradient_checkpointing": qlora.get("gradient_checkpointing"),
                      "job_published": bool(qlora.get("published")), "job_exit_code": qlora.get("exit_code")}
        for gc, r in trlq.items():
            if r:
                s["qlora"][f"trl_gc{gc}"] = {k: r.get(k) for k in ("config", "exit_code", "tokens_per_s", "peak_mem_gib",
                                                                   "step_s_median")}
                if q and r.get("tokens_per_s"):
                    s["qlora"][f"ratio_vs_trl_gc{gc}"] = round(q / r["tokens_per_s"], 2)
    for extra in sorted(res_dir.glob("job_*.json")):
        name = extra.stem[4:]
        if name not in ("bf16", "qlora", "qwen", "fp8", "bf16_warm") and not name.startswith("parity"):
            r = json.loads(extra.read_text())
            s[f"job_{name}"] = {k: r.get(k) for k in ("exit_code", "published", "tokens_per_second_steady",
                                                    "peak_gpu_gib", "oom_backoffs", "loss_scaling", "steps",
                                                    "first_step_seconds", "log_timing", "compile_cache")}
            if r.get("profile"):
                s[f"job_{name}"]["profile"] = {k: r["profile"].get(k) for k in (
                    "window", "steps", "tokens", "wall_s", "tokens_per_s_under_profiler", "gpu_busy_fraction_of_wall",
                    "gpu_idle_s", "share_of_kernel_time", "gaps_between_kernels", "compile_before_window")}
    Path(outfile).write_text(json.dumps(s, indent=1))
    print(json.dumps(s, indent=1))


def moving_average(values: list[float], window: int = 20) -> list[float]:
    return [sum(values[i - window + 1:i + 1]) / window for i in range(window - 1, len(values))]


def _parity(bf16: dict, fp8: dict, warm: dict) -> dict:
    """FP8 against bf16, the same run otherwise: the 20-step moving averages of the training loss compared
    at every step (the issue's bar: within 1%), validation loss, the merge check; and the warm rerun."""
    out: dict = {}
    if bf16.get("history") and fp8.get("history"):
        a = moving_average([x for _, x in bf16["history"]])
        b = moving_average([x for _, x in fp8["history"]])
        n = min(len(a), len(b))
        diffs = [abs(b[i] - a[i]) / a[i] for i in range(n)]
        worst = max(range(n), key=lambda i: diffs[i]) if n else None
        out["fp8_parity"] = {
            "steps": [len(bf16["history"]), len(fp8["history"])],
            "loss_first": [bf16["history"][0][1], fp8["history"][0][1]],
            "ma20_final": [round(a[n - 1], 4), round(b[n - 1], 4)] if n else None,
            "ma20_max_rel_diff": round(diffs[worst], 5) if n else None,
            "ma20_max_rel_diff_at_step": worst + 20 if n else None,
            "ma20_within_1pct": bool(n) and diffs[worst] <= 0.01,
            "val_loss_after": [bf16.get("val_loss_after"), fp8.get("val_loss_after")],
            "merge_check": [(bf16.get("merge") or {}).get("ok"), (fp8.get("merge") or {}).get("ok")],
            "merge_fp8": {k: (fp8.get("merge") or {}).get(k) for k in ("ok", "max_relative_logit_diff", "worst_rel_error",
                                                                      "tolerance")},
            "tokens_per_s_steady": [bf16.get("tokens_per_second_steady"), fp8.get("tokens_per_second_steady")],
            "peak_gib": [bf16.get("peak_gpu_gib"), fp8.get("peak_gpu_gib")],
            "first_step_seconds": [bf16.get("first_step_seconds"), fp8.get("first_step_seconds")],
        }
    if warm:
        out["warm_start"] = {"first_step_seconds_cold": bf16.get("first_step_seconds"),
                             "first_step_seconds_warm": warm.get("first_step_seconds"),
                             "compile_cache": warm.get("compile_cache"), "published": warm.get("published"),
                             "version": warm.get("version"), "train_seconds_cold": (bf16.get("stages") or {}).get(
                                 "train", {}).get("seconds"),
                             "train_seconds_warm": (warm.get("stages") or {}).get("train", {}).get("seconds")}
    return out


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    fn = {"models": cmd_models, "data": lambda p, t, n: cmd_data(p, t, int(n)), "job": cmd_job, "trl": cmd_trl,
          "pairs": lambda p, t, n: cmd_pairs(p, t, int(n)),
          "longdata": lambda p, t, n, k: cmd_longdata(p, t, int(n), int(k)), "trldpo": cmd_trldpo, "summary": cmd_summary}[cmd]
    rc = fn(*args)
    sys.exit(rc if isinstance(rc, int) else 0)
