"""Nothing trains on damaged inputs: data/processed is verified against meta.json's hashes where a run uses it, a
checkpoint is checked (its zip CRCs, its fit to the configured model) before a run resumes from it, checkpoints are
written whole or not at all, a resumed run is another trial than a fresh one, and a store that fails during a run
costs no local result (issue 23, items 1 to 3)."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import BIN, PROJECT_ROOT, cli_env, fast_overrides, read_csv, run_train, store_runs
from omegaconf import OmegaConf

from mnistlab.tracking.resume import config_hash


@pytest.fixture
def own_data(tmp_path, processed_dir):
    """A copy of the fixture's data/processed that a test may damage."""
    shutil.copytree(processed_dir, tmp_path / "processed")
    return tmp_path / "processed"


def _refused(proc, tmp_path, *words):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr
    assert store_runs(tmp_path / "mlruns")[1] == [], "no run may open"
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("damage", ["labels swapped", "pixels inverted"])
def test_damaged_processed_data_is_refused_before_a_run_opens(tmp_path, own_data, damage):
    """Issue 23's reproductions: y_val copied over y_train, and a stretch of x_train inverted, both trained silently
    and were recorded with the canonical checksum."""
    if damage == "labels swapped":
        shutil.copy(own_data / "y_val.npy", own_data / "y_train.npy")
        changed = "y_train"
    else:
        x = np.load(own_data / "x_train.npy")
        x[100:300] = 255 - x[100:300]
        np.save(own_data / "x_train.npy", x)
        changed = "x_train"
    proc = run_train(PROJECT_ROOT, *fast_overrides(tmp_path, own_data, epochs=1), f"data.processed_dir={own_data}")
    _refused(proc, tmp_path, f"{changed} no longer match", "dvc checkout data/processed", "dvc repro preprocess")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, processed_dir):
    """last.ckpt of a real one-epoch run."""
    tmp = tmp_path_factory.mktemp("ckpt")
    proc = run_train(PROJECT_ROOT, *fast_overrides(tmp, processed_dir, epochs=1), "logger=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out" / "checkpoints" / "last.ckpt"


def test_a_checkpoint_damaged_inside_its_weights_is_refused_naming_the_member(tmp_path, processed_dir, checkpoint):
    bad = tmp_path / "damaged.ckpt"
    shutil.copy(checkpoint, bad)
    with zipfile.ZipFile(bad) as z:  # the biggest member holds the first layer's weights
        member = max(z.infolist(), key=lambda i: i.file_size)
        start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra) + member.file_size // 2
    data = bytearray(bad.read_bytes())
    data[start:start + 4096] = bytes(b ^ 0x5A for b in data[start:start + 4096])
    bad.write_bytes(data)
    assert zipfile.is_zipfile(bad), "the archive still opens: only its CRC tells"
    proc = run_train(PROJECT_ROOT, *fast_overrides(tmp_path, processed_dir, epochs=2), f"ckpt_path={bad}")
    _refused(proc, tmp_path, "damaged: the CRC of its member", member.filename)


def test_a_checkpoint_of_another_model_size_is_refused_naming_the_key(tmp_path, processed_dir, checkpoint):
    proc = run_train(PROJECT_ROOT, *fast_overrides(tmp_path, processed_dir, epochs=2), f"ckpt_path={checkpoint}",
                     "model.hidden_sizes=[64]")
    _refused(proc, tmp_path, "does not fit the configured model", "net.0.weight has shape [512, 784] there and "
             "[64, 784] in the configured model")
    assert len(proc.stderr.splitlines()) <= 3


def test_a_resumed_run_records_what_it_resumed_and_is_not_a_fresh_trial(tmp_path, processed_dir, checkpoint):
    from mnistlab.tracking.resume import file_digest

    proc = run_train(PROJECT_ROOT, *fast_overrides(tmp_path, processed_dir, epochs=2), f"ckpt_path={checkpoint}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = run_train(PROJECT_ROOT, *fast_overrides(tmp_path, processed_dir, epochs=2), "reuse_finished=true",
                      f"paths.output_dir={tmp_path / 'fresh'}")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    _, runs = store_runs(tmp_path / "mlruns")
    resumed, new = sorted(runs, key=lambda r: r.info.start_time)
    assert resumed.data.tags["mnistlab.resumed_from"] == str(checkpoint)
    assert resumed.data.tags["mnistlab.resumed_from_sha256"] == file_digest(checkpoint)
    assert new.data.tags["mnistlab.config_hash"] != resumed.data.tags["mnistlab.config_hash"]
    assert "mnistlab.reused_from" not in new.data.tags, "a resumed run must not stand in for a fresh trial"

    # resumed into another checkpoint dir, the run keeps the best it resumed from (Lightning dropped its score and
    # warned, so the first resumed epoch became best.ckpt however it scored)
    assert "dirpath has changed" not in proc.stderr
    client = store_runs(tmp_path / "mlruns")[0]
    (epoch2,) = [m.value for m in client.get_metric_history(resumed.info.run_id, "val/acc")]
    old_best = _best_score(checkpoint)
    assert _best_score(tmp_path / "out" / "checkpoints" / "last.ckpt") == pytest.approx(max(old_best, epoch2))
    assert (tmp_path / "out" / "checkpoints" / "best.ckpt").is_file() and checkpoint.with_name("best.ckpt").is_file()


def _best_score(ckpt: Path) -> float:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["callbacks"]
    (score,) = [v["best_model_score"] for k, v in state.items() if k.startswith("ModelCheckpoint")]
    return float(score)


def test_the_config_hash_covers_what_a_run_resumed_from():
    cfg = OmegaConf.create({"optimizer": {"lr": 0.1}, "seed": 0, "ckpt_path": "/a/last.ckpt"})
    plain = config_hash(cfg, "data")
    assert config_hash(cfg, "data", "sha-a") not in (plain, config_hash(cfg, "data", "sha-b"))
    assert config_hash(OmegaConf.merge(cfg, {"ckpt_path": "/b/last.ckpt"}), "data") == plain  # the path is not


_WRITE_UNDER_A_FILE_SIZE_LIMIT = textwrap.dedent("""
    import sys, torch
    from mnistlab.checkpoint_io import AtomicCheckpointIO
    path = sys.argv[1]
    try:
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1 << 20)}}, path)  # 4 MiB
    except OSError as e:
        print("refused:", e.errno)
""")


def test_a_checkpoint_write_that_fails_leaves_the_previous_file_and_no_partial_one(tmp_path):
    """A full disk, as a write limit (RLIMIT_FSIZE, 1 MiB): Lightning's own writer left a truncated .ckpt."""
    target = tmp_path / "ckpts" / "best.ckpt"
    target.parent.mkdir()
    target.write_bytes(b"previous checkpoint")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc = subprocess.run([sys.executable, "-c", _WRITE_UNDER_A_FILE_SIZE_LIMIT, str(target)], preexec_fn=limit,
                          capture_output=True, text=True, timeout=120)
    assert "refused: 27" in proc.stdout, proc.stdout + proc.stderr  # EFBIG
    assert target.read_bytes() == b"previous checkpoint"
    assert [p.name for p in target.parent.iterdir()] == ["best.ckpt"], "no temporary file is left"


# --- a store that fails during a run costs no local result (issue 23, item 3) -------------------------------------

class MoveStoreAway(pl.Callback):
    """At the start of epoch `epoch`, move the SQLite store's file away (as a user or a cleanup script might)."""

    def __init__(self, db: str, epoch: int = 1):
        self.db, self.epoch = Path(db), epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch and self.db.exists():
            self.db.rename(self.db.with_name("moved.db"))


def _train_with(tmp_path, processed_dir, *extra):
    return subprocess.run(
        [sys.executable, "-m", "mnistlab.train", *fast_overrides(tmp_path, processed_dir, epochs=3),
         f"hydra.run.dir={tmp_path / 'hydra'}", *extra],
        cwd=PROJECT_ROOT, env=cli_env(PYTHONPATH=str(PROJECT_ROOT / "tests")), capture_output=True, text=True,
        timeout=300)


def test_a_store_that_fails_mid_run_loses_no_local_result(tmp_path, processed_dir):
    """Issue 23: mlflow.db moved away during a 3-epoch run gave exit 1, 1,250+ lines with 38 tracebacks, the run
    RUNNING and no checkpoint, metrics.json or curves.csv. Now: training and test finish, every local output is
    written, one paragraph names the store and the fix, exit 3; clean-stale closes the run once the store is back."""
    db = tmp_path / "mlruns" / "mlflow.db"
    proc = _train_with(tmp_path, processed_dir, "+callbacks.mover._target_=test_integrity.MoveStoreAway",
                       f"+callbacks.mover.db={db}")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("error: the MLflow store") == 1, proc.stderr[-3000:]
    assert "make clean-stale" in proc.stderr and "metrics.json" in proc.stderr
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and 0 < metrics["test/acc"] <= 1
    assert len((out / "curves.csv").read_text().splitlines()) == 1 + 3
    assert (out / "timing.json").is_file() and (out / "checkpoints" / "best.ckpt").is_file()
    status = json.loads((tmp_path / "hydra" / ".mnistlab_trial.json").read_text())
    assert status["status"] == "FINISHED" and status["error"].startswith("not recorded in MLflow")

    db.unlink(missing_ok=True)
    (db.with_name("moved.db")).rename(db)  # the store is back
    client, (run,) = store_runs(tmp_path / "mlruns")
    assert run.info.status == "RUNNING"
    cleaned = subprocess.run([str(BIN / "mnistlab-runs"), "clean-stale", "--tracking-uri", f"sqlite:///{db}"],
                             env=cli_env(), capture_output=True, text=True, timeout=120)
    assert cleaned.returncode == 0, cleaned.stderr
    assert client.get_run(run.info.run_id).info.status == "KILLED"


def _tmpfs(mount: Path, size: str):
    """A tmpfs of `size` at `mount` (a disk that fills in seconds); needs root, as CI has."""
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def tiny_disk(tmp_path):
    """4 MiB: full before a run starts."""
    yield from _tmpfs(tmp_path / "disk", "4m")


@pytest.fixture
def small_disk(tmp_path):
    """40 MiB: room for a run to start, filled during it by FillDisk."""
    yield from _tmpfs(tmp_path / "disk", "40m")


class FillDisk(pl.Callback):
    """At the start of epoch `epoch`, fill the disk under `folder` (another program's download, a log that grew)."""

    def __init__(self, folder: str, epoch: int = 1):
        self.folder, self.epoch = Path(folder), epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            with open(self.folder / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 16))
                        f.flush()
                except OSError:
                    pass


def test_a_run_dir_whose_disk_fills_mid_run_fails_in_one_paragraph_with_no_partial_file(tmp_path, processed_dir,
                                                                                         small_disk):
    """Issue 23: the run dir on a full tmpfs gave exit 1, a 66-line traceback and a 2 MB best.ckpt that was not a zip.
    Now: exit 1, one paragraph naming the disk and the fix, the run FAILED, and every file left whole."""
    out = small_disk / "out"
    proc = _train_with(tmp_path, processed_dir, f"paths.output_dir={out}", "+callbacks.fill._target_=test_integrity.FillDisk",
                       f"+callbacks.fill.folder={small_disk}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "error: the disk is full (No space left on device" in proc.stderr
    assert "paths.output_dir" in proc.stderr, proc.stderr[-3000:]
    _, (run,) = store_runs(tmp_path / "mlruns")
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["mnistlab.error"]
    for ckpt in out.rglob("*.ckpt*"):
        assert ckpt.suffix == ".ckpt" and zipfile.ZipFile(ckpt).testzip() is None, ckpt  # whole, no temp left
    assert not (out / "metrics.json").exists()


def test_a_store_whose_disk_fills_mid_run_loses_no_local_result(tmp_path, processed_dir, small_disk):
    """Issue 23: with only the store's disk full, training and test finished but metrics.json, curves.csv and
    timing.json were never written. Now they are, and the exit status says the run was not recorded (3)."""
    proc = _train_with(tmp_path, processed_dir, f"paths.mlruns_dir={small_disk / 'mlruns'}", "logger.log_model=false",
                       "+callbacks.fill._target_=test_integrity.FillDisk", f"+callbacks.fill.folder={small_disk}")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("error: the MLflow store") == 1, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 3
    assert len(read_csv(out / "curves.csv")) == 3 and (out / "timing.json").is_file()
    status = json.loads((tmp_path / "hydra" / ".mnistlab_trial.json").read_text())
    assert status["status"] == "FINISHED" and status["error"].startswith("not recorded in MLflow")


def test_a_full_store_disk_or_a_store_damaged_inside_is_refused_at_start_up(tmp_path, processed_dir, tiny_disk):
    full = tiny_disk / "mlruns"
    full.mkdir()
    with open(tiny_disk / "filler", "wb") as f:
        try:
            f.write(b"\0" * (8 << 20))
        except OSError:
            pass
    proc = run_train(PROJECT_ROOT, *fast_overrides(tmp_path, processed_dir), f"paths.mlruns_dir={full}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "MiB free, less than a run writes there" in proc.stderr and "Traceback" not in proc.stderr

    # a store damaged mid-file: its header still reads, quick_check finds the rest
    from mlflow import MlflowClient

    store = tmp_path / "damaged"
    store.mkdir()
    MlflowClient(f"sqlite:///{store / 'mlflow.db'}").create_experiment("mnistlab")
    data = bytearray((store / "mlflow.db").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 200_000] = bytes(min(200_000, len(data) - middle))
    (store / "mlflow.db").write_bytes(data)
    proc = run_train(PROJECT_ROOT, *fast_overrides(tmp_path, processed_dir), f"paths.mlruns_dir={store}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{store / 'mlflow.db'} is corrupt" in proc.stderr and "Traceback" not in proc.stderr
