"""Nothing trains on damaged inputs: data/processed is verified against meta.json's hashes where a run uses it, a
checkpoint is checked (its zip CRCs, its fit to the configured model) before a run resumes from it, checkpoints are
written whole or not at all, and a resumed run is another trial than a fresh one (issue 23, items 1 and 2)."""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from conftest import PROJECT_ROOT, fast_overrides, run_train, store_runs
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
