"""An output that cannot be written fails before any work, with the never-retried storage code; an interrupted
publish leaves nothing that could be taken for a version; Ctrl-C on the job is "cancelled", exit 130."""
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from jobs.errors import ExitCode, StorageError
from jobs.progress import describe
from jobs.publish import existing_versions, publish_version, verify_version
from jobs.trainer.recipe import check_output_writable
from jobs.storage import LocalStore, open_store

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def test_an_output_that_names_a_file_is_refused_with_the_fix(tmp_path):
    f = tmp_path / "results.txt"
    f.write_text("not a folder")
    store, prefix = open_store(str(f))
    with pytest.raises(StorageError) as e:
        check_output_writable(store, "my-run", "r1")
    assert e.value.exit_code == ExitCode.STORAGE
    assert f"{f} is a file, not a folder" in str(e.value) and "fix: point output at a folder" in str(e.value)


def test_an_output_on_a_pseudo_file_system_is_refused(tmp_path):
    store, _ = open_store("/proc/lora-jobs-output")
    with pytest.raises(StorageError) as e:
        check_output_writable(store, "my-run", "r1")
    assert "cannot write /proc/lora-jobs-output/my-run/.write-probe-r1" in str(e.value)


def test_a_writable_output_keeps_no_trace_of_the_probe(tmp_path):
    store = LocalStore(str(tmp_path / "out"))
    check_output_writable(store, "my-run", "r1")
    assert store.list("") == []


def test_an_interrupted_publish_leaves_no_files_and_the_number_is_free_again(tmp_path):
    folder = tmp_path / "publish"
    (folder / "adapter").mkdir(parents=True)
    for i in range(6):
        (folder / "adapter" / f"part-{i}.bin").write_bytes(os.urandom(1000))
    store = LocalStore(str(tmp_path / "bucket"))
    real_put = store.put_file
    calls, sent, lock = [], [], threading.Lock()

    def put_file(path, key, progress=None):  # the real copy; the third upload to start is where Ctrl-C lands
        with lock:
            calls.append(key)
            nth = len(calls)
        if nth == 3:
            raise KeyboardInterrupt
        real_put(path, key, progress)
        sent.append(key)

    store.put_file = put_file
    with pytest.raises(KeyboardInterrupt):
        publish_version(store, "run", folder)
    assert len(sent) >= 2, "the uploads started before the interrupt reached the store"
    assert store.list("run/") == [], "everything the interrupted publish uploaded was removed"
    # a folder store keeps the empty v1/ folder (no marker: skipped, never reused); a bucket has no folders
    assert existing_versions(store, "run") in ({}, {1: False})
    store.put_file = real_put
    version = publish_version(store, "run", folder)
    assert verify_version(store, "run", version) == [] and store.get_bytes("run/latest").decode().strip() == version


def _job(tmp_path: Path, output: str) -> subprocess.Popen:
    spec = yaml.safe_load((REPO / "examples" / "demo" / "spec.yaml").read_text())
    (tmp_path / "model").mkdir()  # never read: the output is checked first
    (tmp_path / "train.jsonl").write_text('{"instruction": "Hi?", "output": "Hello."}\n')
    spec["base_model"]["uri"] = str(tmp_path / "model")
    spec["dataset"] = {"train": str(tmp_path / "train.jsonl")}
    spec["eval"] = {"enabled": False}
    spec["output"] = output
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERMINATION_MESSAGE_PATH": str(tmp_path / "termination")}
    return subprocess.Popen([sys.executable, "-m", "jobs", "run", "--spec", str(tmp_path / "spec.yaml"),
                             "--workdir", str(tmp_path / "work")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_the_job_stops_on_an_unwritable_output_before_fetching_anything(tmp_path):
    (tmp_path / "out").write_text("a file where the output folder should be")
    proc = _job(tmp_path, str(tmp_path / "out"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == ExitCode.STORAGE, err
    assert "is a file, not a folder" in err and "Traceback" not in err, err
    assert "── fetch" not in err, "nothing was fetched"
    assert '"exit_code": 12' in (tmp_path / "termination").read_text()


def test_describe_words_a_cancelled_run():
    assert describe({"state": "cancelled", "stage": "train"}) == "cancelled in train"


def test_the_data_counts_of_a_run_read_as_one_line():
    from jobs.progress import describe_data

    counts = {"lines": 179, "blank": 0, "malformed": 3, "outside_format": 0, "valid": 176, "kept": 173,
              "dropped_by_rule": {"dedup_exact": 1, "dedup_near": 1, "strip_boilerplate": 1, "pii": 0},
              "by_format": {"instruction": {"valid": 170, "kept": 168}, "messages": {"valid": 6, "kept": 5}}}
    assert describe_data(counts) == ("173 rows kept of 179 lines: 3 malformed, 3 dropped by the rules (dedup_exact 1, "
                                     "dedup_near 1, strip_boilerplate 1); kept by format: instruction 168, messages 5")
    assert describe_data({"lines": 10, "kept": 10, "by_format": {"instruction": {"kept": 10}}}) == \
        "10 rows kept of 10 lines"
    # a preference run's data is counted in pairs, and one of anything takes the singular
    assert describe_data({"lines": 1, "kept": 1, "unit": "pairs"}) == "1 pair kept of 1 line"
    assert describe_data({"lines": 63, "kept": 40, "unit": "pairs", "malformed": 11}) == \
        "40 pairs kept of 63 lines: 11 malformed"
