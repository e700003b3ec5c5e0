"""Cold-start download benchmark: jobs.storage.download_file_ranged against s5cmd.

Both fetch the same object (random bytes, default 2 GiB) from the local stack's MinIO
over loopback to a local file. Runs alternate (ours, s5cmd, then s5cmd, ours, ...),
the written file is deleted and ``sync`` run between runs, and every file is checked
byte for byte (sha256) outside the timed part. Prints MiB/s per run, the median of
each, and the ratio ours/s5cmd; writes JSON and a markdown table to
``benchmarks/results/<date>-s3-download/``.

    source .stack/env    # or let the script read it
    PYTHONPATH=. python benchmarks/s3_download.py                       # 2 GiB, 5 pairs
    PYTHONPATH=. python benchmarks/s3_download.py --sweep 8x4,32x8,32x8x1024 --sweep-runs 2

``--sweep PARTxWORKERS[xREAD],...`` (part size in MiB, read size in KiB) first measures those settings of ours,
round-robin with s5cmd, to choose defaults by data. s5cmd is built on demand by
``hack/build-stack.sh s5cmd`` (pinned by S5CMD_VERSION in hack/versions.env) and run
exactly as ``s5cmd --endpoint-url $AWS_ENDPOINT_URL cp s3://BUCKET/KEY PATH``.

Each run is a fresh process. What is timed: ours = a new boto3 client + HEAD + the ranged
GETs written in place + rename, timed inside its process (interpreter start and imports,
~0.5 s, are left out: the job pays them once, and they are in ``process_seconds``);
s5cmd = the whole process, exec to exit. Neither fsyncs.
The object is deleted from MinIO and the local files removed at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs import storage  # noqa: E402

MiB = 2**20


def load_stack_env() -> None:
    """Take the AWS_* and STACK_* variables from .stack/env where the shell did not."""
    env_file = REPO / ".stack" / "env"
    if not env_file.is_file():
        return
    for line in env_file.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[7:].partition("=")
            os.environ.setdefault(key, shlex.split(value)[0] if value else "")


def build_s5cmd() -> tuple[str, str]:
    """(path, version): built once into the stack cache by hack/build-stack.sh."""
    subprocess.run(["bash", str(REPO / "hack" / "build-stack.sh"), "s5cmd"], check=True, stdout=sys.stderr)
    out = subprocess.run(["bash", "-c", f'. "{REPO}/hack/lib.sh"; echo "$S5CMD_VERSION"; '
                                        'piece_bin s5cmd "$S5CMD_VERSION" s5cmd'],
                         check=True, capture_output=True, text=True).stdout.split()
    return out[1], out[0]


def make_object(client, bucket: str, key: str, size: int, part: int = 64 * MiB) -> str:
    """Multipart-upload ``size`` random bytes (generated part by part); the sha256 of the content."""
    digest = hashlib.sha256()
    up = client.create_multipart_upload(Bucket=bucket, Key=key)
    try:
        parts = []
        for n, off in enumerate(range(0, size, part), start=1):
            data = os.urandom(min(part, size - off))
            digest.update(data)
            etag = client.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=n, Body=data)["ETag"]
            parts.append({"PartNumber": n, "ETag": etag})
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"],
                                         MultipartUpload={"Parts": parts})
    except BaseException:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"])
        raise
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def proc_cpu(pid: int | None) -> float:
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def system_counters() -> dict[str, float]:
    """Machine-wide: CPU steal (s) and memory-pressure events, to explain outliers (other tenants count too)."""
    out = {}
    for ln in Path("/proc/vmstat").read_text().splitlines():
        k, v = ln.split()
        if k in ("pgscan_direct", "compact_stall"):
            out[k] = float(v)
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()
    out["steal_s"] = int(cpu[8]) / os.sysconf("SC_CLK_TCK") if len(cpu) > 8 else 0.0
    return out


def minio_pid() -> int | None:
    try:
        return int(Path(os.environ["STACK_MINIO_PID_FILE"]).read_text().strip())
    except (KeyError, OSError, ValueError):
        return None


class Runner:
    def __init__(self, args, s5cmd: str, sha: str):
        self.args, self.s5cmd, self.sha = args, s5cmd, sha
        self.dest = Path(args.dir) / f"s3-download-bench-{uuid.uuid4().hex[:8]}.bin"
        self.minio = minio_pid()
        self.endpoint = os.environ["AWS_ENDPOINT_URL"]
        self.runs: list[dict] = []

    def s5cmd_argv(self, extra: list[str] | None = None) -> list[str]:
        return [self.s5cmd, "--endpoint-url", self.endpoint, "cp", *(extra or []),
                f"s3://{self.args.bucket}/{self.args.key}", str(self.dest)]

    def _clean(self) -> None:
        self.dest.unlink(missing_ok=True)
        for stray in self.dest.parent.glob(self.dest.name + "*"):  # .part, s5cmd's temp names
            stray.unlink(missing_ok=True)
        os.sync()
        time.sleep(self.args.settle)

    def one(self, tool: str, phase: str, part_mib: int = 0, workers: int = 0, read_kib: int = 0,
            s5cmd_extra: list[str] | None = None):
        self._clean()
        load = os.getloadavg()[0]
        sys0 = system_counters()
        m0 = proc_cpu(self.minio)
        if tool == "ours":  # a fresh process, like s5cmd; it times the call itself (see child())
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--child", self.args.bucket, self.args.key, str(self.dest),
                                  str(part_mib), str(workers), str(read_kib)], check=True, capture_output=True,
                                 text=True).stdout
            process_s = time.perf_counter() - t0
            child_row = json.loads(out.strip().splitlines()[-1])
            dt, cpu = child_row["seconds"], child_row["cpu_s"]
            label = f"ours part={part_mib}MiB workers={workers} read={read_kib}KiB"
        else:
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(self.s5cmd_argv(s5cmd_extra), check=True, stdout=subprocess.DEVNULL)
            dt = process_s = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            label = "s5cmd " + (" ".join(s5cmd_extra) if s5cmd_extra else "defaults (-c 5 -p 50)")
            cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        minio_cpu = proc_cpu(self.minio) - m0
        system = {k: round(v - sys0[k], 2) for k, v in system_counters().items()}
        ok = self.dest.stat().st_size == self.args.size_mib * MiB and sha256_file(self.dest) == self.sha
        mibs = self.args.size_mib / dt
        row = {"phase": phase, "tool": tool, "label": label, "part_mib": part_mib, "workers": workers, "read_kib": read_kib,
               "s5cmd_extra": s5cmd_extra or [], "seconds": round(dt, 3), "process_seconds": round(process_s, 3),
               "mib_s": round(mibs, 1),
               "client_cpu_s": round(cpu, 2), "minio_cpu_s": round(minio_cpu, 2), "load1_before": round(load, 2),
               "system": system, "bytes_ok": ok}
        self.runs.append(row)
        print(f"  {phase:5} {label:52} {dt:6.2f} s {mibs:7.0f} MiB/s  client cpu {cpu:5.2f} s  "
              f"minio cpu {minio_cpu:5.2f} s  load {load:4.1f}  steal {system['steal_s']:4.2f} s  "
              f"{'ok' if ok else 'BYTES DIFFER'}", flush=True)
        if not ok:
            raise SystemExit(f"{label}: the downloaded file does not match the object")
        return row


def summarize(rows: list[dict]) -> dict:
    speeds = [r["mib_s"] for r in rows]
    return {"runs": len(rows), "median_mib_s": round(statistics.median(speeds), 1), "min_mib_s": min(speeds),
            "max_mib_s": max(speeds), "median_client_cpu_s": round(statistics.median(r["client_cpu_s"] for r in rows), 2),
            "median_minio_cpu_s": round(statistics.median(r["minio_cpu_s"] for r in rows), 2),
            "median_mib_s_incl_process_start": round(statistics.median(
                r["mib_s"] * r["seconds"] / r["process_seconds"] for r in rows), 1)}


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")), "0")
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(int(mem) / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def versions(s5cmd_path: str, s5cmd_version: str) -> dict:
    import boto3
    import botocore
    import urllib3

    s5 = subprocess.run([s5cmd_path, "version"], capture_output=True, text=True).stdout.strip()
    minio = subprocess.run(["bash", "-c", f'. "{REPO}/hack/lib.sh"; echo "$MINIO_VERSION"'],
                           capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"s5cmd": f"{s5cmd_version} ({s5})", "minio": minio, "boto3": boto3.__version__,
            "botocore": botocore.__version__, "urllib3": urllib3.__version__, "repo_commit": commit}


def markdown(result: dict) -> str:
    m, v, a = result["machine"], result["versions"], result["settings"]
    lines = [f"# S3 download: ours vs s5cmd ({result['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB, kernel {m['kernel']}, "
             f"Python {m['python']}; shared with other test runs (load average in the raw rows).",
             f"Versions: s5cmd {v['s5cmd']}, MinIO {v['minio']} (built from source, single drive, loopback), "
             f"boto3 {v['boto3']}, botocore {v['botocore']}, urllib3 {v['urllib3']}; repo {v['repo_commit']}.",
             f"Object: {a['size_mib']} MiB of random bytes (multipart upload, 64 MiB parts) in "
             f"s3://{a['bucket']}; destination {a['dir']} ({a['fstype']}); every file checked by sha256.", "",
             "Commands:", "", "```", result["command"], "```", "",
             f"s5cmd as run: `{result['s5cmd_command']}`", "",
             "Each run is a fresh process. Ours is timed inside its process (client, HEAD, GETs, rename); "
             "s5cmd exec to exit. 'incl. process start' adds ours' interpreter start and imports.", ""]
    if result.get("sweep"):
        lines += ["## Sweep (choosing the defaults)", "",
                  "| setting | runs | median MiB/s | min | max | client CPU s (median) | MinIO CPU s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for label, s in result["sweep"].items():
            lines.append(f"| {label} | {s['runs']} | {s['median_mib_s']:.0f} | {s['min_mib_s']:.0f} | "
                         f"{s['max_mib_s']:.0f} | {s['median_client_cpu_s']} | {s['median_minio_cpu_s']} |")
        lines.append("")
    c = result["compare"]
    lines += ["## Head to head (alternating runs)", "",
              "| tool | settings | runs | median MiB/s | min | max | median incl. process start | "
              "client CPU s (median) | MinIO CPU s |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for tool in ("ours", "s5cmd"):
        s = c[tool]
        lines.append(f"| {tool} | {s['label']} | {s['runs']} | **{s['median_mib_s']:.0f}** | {s['min_mib_s']:.0f} | "
                     f"{s['max_mib_s']:.0f} | {s['median_mib_s_incl_process_start']:.0f} | "
                     f"{s['median_client_cpu_s']} | {s['median_minio_cpu_s']} |")
    lines += ["", f"**Ratio ours/s5cmd (medians): {c['ratio_of_medians']:.2f}**; per-pair ratios "
              f"{', '.join(f'{r:.2f}' for r in c['pair_ratios'])} (median {c['median_pair_ratio']:.2f}).", "",
              "Raw rows: `results.json`.", ""]
    return "\n".join(lines)


def child(bucket: str, key: str, dest: str, part_mib: str, workers: str, read_kib: str) -> int:
    """One run of ours in this (fresh) process: a new client, HEAD, ranged GETs, rename; prints its JSON row."""
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    storage.download_file_ranged(storage.S3Store(bucket), key, dest, part_size=int(part_mib) * MiB,
                                 workers=int(workers), read_size=int(read_kib) * 1024)
    dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(json.dumps({"seconds": dt, "cpu_s": cpu}))
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        return child(*sys.argv[2:8])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=2048)
    p.add_argument("--pairs", type=int, default=5, help="alternating runs of each in the head to head (>= 3)")
    p.add_argument("--part-mib", type=int, default=storage.RANGED_PART_SIZE // MiB)
    p.add_argument("--workers", type=int, default=storage.RANGED_WORKERS)
    p.add_argument("--read-kib", type=int, default=storage.RANGED_READ_SIZE // 1024)
    p.add_argument("--sweep", default="", help="PARTxWORKERS[xREAD],... settings of ours to measure first "
                   "(MiB x threads x KiB; the read size defaults to --read-kib)")
    p.add_argument("--sweep-runs", type=int, default=2)
    p.add_argument("--s5cmd-sweep", default="", help="extra s5cmd flag sets for the sweep, ';'-separated, "
                   "e.g. '--concurrency 8 --part-size 32'")
    p.add_argument("--bucket", default=None, help="default: $STACK_TEST_BUCKET")
    p.add_argument("--dir", default="/tmp", help="where the downloads are written")
    p.add_argument("--settle", type=float, default=1.0, help="seconds to wait after sync between runs")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<date>-s3-download)")
    args = p.parse_args()
    if args.pairs < 1:
        p.error("--pairs must be at least 1")

    load_stack_env()
    missing = [k for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(k)]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not set: `source .stack/env` (hack/stack.sh up --s3-only)")
    args.bucket = args.bucket or os.environ.get("STACK_TEST_BUCKET", "lora-test")
    args.key = f"bench/s3-download-{uuid.uuid4().hex[:8]}.bin"
    size = args.size_mib * MiB
    free = shutil.disk_usage(args.dir).free
    if free < 3 * size + 2**30:  # the object in MinIO (same disk here) + one download + a margin
        raise SystemExit(f"{args.dir} has {free / 2**30:.1f} GiB free; this needs {(3 * size + 2**30) / 2**30:.1f}")

    s5cmd_path, s5cmd_version = build_s5cmd()
    client = storage.make_s3_client()
    print(f"uploading {args.size_mib} MiB of random bytes to s3://{args.bucket}/{args.key}", flush=True)
    sha = make_object(client, args.bucket, args.key, size)
    runner = Runner(args, s5cmd_path, sha)
    result: dict = {}
    try:
        sweep = [(*(int(x) for x in s.lower().split("x")), args.read_kib)[:3] for s in args.sweep.split(",") if s.strip()]
        s5_sets = [shlex.split(s) for s in args.s5cmd_sweep.split(";") if s.strip()]
        print("warm-up (not counted)")
        runner.one("ours", "warm", args.part_mib, args.workers, args.read_kib)
        runner.one("s5cmd", "warm")
        sweep_summary = {}
        if sweep or s5_sets:
            print("sweep")
            for _ in range(args.sweep_runs):
                for part_mib, workers, read_kib in sweep:
                    runner.one("ours", "sweep", part_mib, workers, read_kib)
                runner.one("s5cmd", "sweep")
                for extra in s5_sets:
                    runner.one("s5cmd", "sweep", s5cmd_extra=extra)
            for label in dict.fromkeys(r["label"] for r in runner.runs if r["phase"] == "sweep"):
                sweep_summary[label] = summarize([r for r in runner.runs if r["phase"] == "sweep"
                                                  and r["label"] == label])
        print("head to head")
        pairs = []
        for i in range(args.pairs):
            order = ("ours", "s5cmd") if i % 2 == 0 else ("s5cmd", "ours")
            got = {tool: runner.one(tool, "h2h", args.part_mib, args.workers, args.read_kib) if tool == "ours"
                   else runner.one(tool, "h2h") for tool in order}
            pairs.append(got["ours"]["mib_s"] / got["s5cmd"]["mib_s"])
        compare = {}
        for tool in ("ours", "s5cmd"):
            rows = [r for r in runner.runs if r["phase"] == "h2h" and r["tool"] == tool]
            compare[tool] = {"label": rows[0]["label"], **summarize(rows)}
        compare["ratio_of_medians"] = round(compare["ours"]["median_mib_s"] / compare["s5cmd"]["median_mib_s"], 3)
        compare["pair_ratios"] = [round(r, 3) for r in pairs]
        compare["median_pair_ratio"] = round(statistics.median(pairs), 3)
        fstype = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", args.dir], capture_output=True,
                                text=True).stdout.strip() or "?"
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine(), "versions": versions(s5cmd_path, s5cmd_version),
            "command": "PYTHONPATH=. python benchmarks/s3_download.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "s5cmd_command": "s5cmd --endpoint-url $AWS_ENDPOINT_URL cp s3://BUCKET/KEY " + str(runner.dest),
            "settings": {"size_mib": args.size_mib, "bucket": args.bucket, "dir": args.dir, "fstype": fstype,
                         "part_mib": args.part_mib, "workers": args.workers, "read_kib": args.read_kib,
                         "pairs": args.pairs,
                         "threshold_mib": storage.RANGED_THRESHOLD // MiB},
            "sweep": sweep_summary, "compare": compare, "runs": runner.runs,
        }
    finally:
        runner.dest.unlink(missing_ok=True)
        for stray in runner.dest.parent.glob(runner.dest.name + "*"):
            stray.unlink(missing_ok=True)
        for attempt in range(6):  # MinIO may be restarting (shared stack): try for ~30 s
            try:
                client.delete_object(Bucket=args.bucket, Key=args.key)
                print(f"deleted s3://{args.bucket}/{args.key} and the local files", flush=True)
                break
            except Exception as err:  # noqa: BLE001 - reported, then retried
                print(f"could not delete s3://{args.bucket}/{args.key} yet: {err}", file=sys.stderr, flush=True)
                time.sleep(5)
        else:
            print(f"WARNING: s3://{args.bucket}/{args.key} ({args.size_mib} MiB) is still in MinIO: delete it",
                  file=sys.stderr, flush=True)

    c = result["compare"]
    print(f"\nours  {c['ours']['label']}: median {c['ours']['median_mib_s']:.0f} MiB/s "
          f"(min {c['ours']['min_mib_s']:.0f}, max {c['ours']['max_mib_s']:.0f})")
    print(f"s5cmd {c['s5cmd']['label']}: median {c['s5cmd']['median_mib_s']:.0f} MiB/s "
          f"(min {c['s5cmd']['min_mib_s']:.0f}, max {c['s5cmd']['max_mib_s']:.0f})")
    print(f"ratio ours/s5cmd: {c['ratio_of_medians']:.2f} (medians); per pair {c['pair_ratios']}")
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"{time.strftime('%Y-%m-%d')}-s3-download"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "results.md").write_text(markdown(result))
    print(f"wrote {out}/results.json and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
