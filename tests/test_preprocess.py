"""The preprocess stage on generated data: the split, meta.json, atomic replacement, the CLI's errors."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, cli_env, fake_mnist, write_idx, write_npz

from mnistlab.data.mnist_files import MnistDataError, sha256_of
from mnistlab.data.preprocess import (
    META_NAME,
    SPLITS,
    data_checksum,
    load_processed,
    preprocess,
    split_indices,
)

FILES = sorted([META_NAME] + [f"{a}_{s}.npy" for s in SPLITS for a in ("x", "y")])


@pytest.fixture
def raw(tmp_path, fake_arrays) -> Path:
    write_npz(tmp_path / "raw", fake_arrays)
    return tmp_path / "raw"


def run_pp(raw_dir: Path, out: Path, val_size: int = 100, seed: int = 0) -> dict:
    return preprocess(raw_dir, out, val_size=val_size, split_seed=seed, verify_checksums=False)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(parent: Path) -> list[str]:
    """Temp/old directories preprocess may leave next to its output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".processed."))


def rows(x: np.ndarray) -> list[bytes]:
    return sorted(r.tobytes() for r in x.reshape(len(x), -1))


# --- the split -----------------------------------------------------------------------------------


@pytest.mark.parametrize("val_size", [1, 100, 599])
def test_split_counts_as_configured(raw, tmp_path, val_size):
    out = tmp_path / "processed"
    meta = run_pp(raw, out, val_size=val_size)
    assert sorted(p.name for p in out.iterdir()) == FILES
    splits, _ = load_processed(out)
    assert len(splits["train"][0]) == len(splits["train"][1]) == 600 - val_size
    assert len(splits["val"][0]) == len(splits["val"][1]) == val_size
    assert len(splits["test"][0]) == len(splits["test"][1]) == 200
    assert meta["counts"] == {"train": 600 - val_size, "val": val_size, "test": 200}


def test_split_is_deterministic_per_seed(raw, tmp_path):
    run_pp(raw, tmp_path / "a", seed=0)
    run_pp(raw, tmp_path / "b", seed=0)
    a, b = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert a == b  # byte-identical files, meta.json included
    run_pp(raw, tmp_path / "c", seed=1)
    val_a, val_c = np.load(tmp_path / "a" / "x_val.npy"), np.load(tmp_path / "c" / "x_val.npy")
    assert val_a.shape == val_c.shape
    assert not np.array_equal(val_a, val_c)
    # the test split never depends on the seed
    assert a["x_test.npy"] == (tmp_path / "c" / "x_test.npy").read_bytes()


def test_split_indices_partition():
    tr, va = split_indices(600, 100, 0)
    assert len(va) == 100 and len(tr) == 500
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)  # each kept in original order
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(600))
    tr2, va2 = split_indices(600, 100, 0)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    assert not np.array_equal(va, split_indices(600, 100, 1)[1])


def test_train_val_disjoint_and_cover_original_train(raw, tmp_path, fake_arrays):
    out = tmp_path / "processed"
    run_pp(raw, out, val_size=100, seed=3)
    splits, _ = load_processed(out)
    (x_tr, y_tr), (x_va, y_va) = splits["train"], splits["val"]
    tr_rows, va_rows = set(rows(x_tr)), set(rows(x_va))
    assert len(tr_rows) == 500 and len(va_rows) == 100  # noise images: every row is unique
    assert not tr_rows & va_rows
    assert rows(np.concatenate([x_tr, x_va])) == rows(fake_arrays["x_train"])
    # each image keeps its label: the processed splits are exactly the original rows at the indices
    tr_idx, va_idx = split_indices(600, 100, 3)
    np.testing.assert_array_equal(x_tr, fake_arrays["x_train"][tr_idx])
    np.testing.assert_array_equal(y_tr, fake_arrays["y_train"][tr_idx])
    np.testing.assert_array_equal(x_va, fake_arrays["x_train"][va_idx])
    np.testing.assert_array_equal(y_va, fake_arrays["y_train"][va_idx])
    np.testing.assert_array_equal(splits["test"][0], fake_arrays["x_test"])
    np.testing.assert_array_equal(splits["test"][1], fake_arrays["y_test"])


def test_outputs_are_uint8_even_from_widened_labels(tmp_path, fake_arrays):
    wide = dict(fake_arrays, y_train=fake_arrays["y_train"].astype(np.int64),
                y_test=fake_arrays["y_test"].astype(np.int32))
    write_npz(tmp_path / "raw", wide)
    run_pp(tmp_path / "raw", tmp_path / "processed")
    splits, _ = load_processed(tmp_path / "processed")
    for s, (x, y) in splits.items():
        assert x.dtype == np.uint8 and y.dtype == np.uint8, s
        assert x.shape[1:] == (28, 28) and y.ndim == 1, s
        assert x.flags.c_contiguous, s


# --- meta.json -----------------------------------------------------------------------------------


def test_meta_json_content(raw, tmp_path, fake_arrays):
    out = tmp_path / "processed"
    returned = run_pp(raw, out, val_size=100, seed=5)
    meta = json.loads((out / META_NAME).read_text())
    assert meta == returned
    splits, _ = load_processed(out)
    hashes = {k: sha256_of(v) for k, v in fake_arrays.items()}
    assert meta["source_format"] == "npz" and meta["source_files"] == ["mnist.npz"]
    assert meta["content_sha256"] == hashes
    assert meta["data_checksum"] == data_checksum(hashes)
    assert len(meta["data_checksum"]) == 16
    assert meta["verified"] is False
    assert meta["val_size"] == 100 and meta["split_seed"] == 5
    assert meta["counts"] == {"train": 500, "val": 100, "test": 200}
    for s in SPLITS:
        assert meta["class_counts"][s] == np.bincount(splits[s][1], minlength=10).tolist(), s
        assert sum(meta["class_counts"][s]) == meta["counts"][s], s
    x_tr = splits["train"][0]
    assert meta["pixel_mean"] == pytest.approx(x_tr.mean() / 255)
    assert meta["pixel_std"] == pytest.approx(x_tr.std() / 255)
    assert 0 < meta["pixel_mean"] < 1


def test_meta_from_idx_matches_npz_content(tmp_path, fake_arrays):
    write_npz(tmp_path / "npz", fake_arrays)
    write_idx(tmp_path / "idx" / "MNIST" / "raw", fake_arrays, gz=True)
    m_npz = run_pp(tmp_path / "npz", tmp_path / "p_npz")
    m_idx = run_pp(tmp_path / "idx", tmp_path / "p_idx")
    assert m_idx["source_format"] == "idx"
    assert m_idx["source_files"][0] == "MNIST/raw/train-images-idx3-ubyte.gz"
    assert m_idx["content_sha256"] == m_npz["content_sha256"]
    assert m_idx["data_checksum"] == m_npz["data_checksum"]
    for name in FILES:
        if name != META_NAME:
            assert (tmp_path / "p_npz" / name).read_bytes() == (tmp_path / "p_idx" / name).read_bytes(), name


def test_data_checksum_tracks_content(tmp_path):
    write_npz(tmp_path / "a", fake_mnist(seed=0))
    write_npz(tmp_path / "b", fake_mnist(seed=1))
    assert run_pp(tmp_path / "a", tmp_path / "pa")["data_checksum"] != run_pp(tmp_path / "b", tmp_path / "pb")["data_checksum"]


def test_load_processed_round_trip(processed_dir, fake_arrays):
    splits, meta = load_processed(processed_dir)
    assert meta["counts"] == {s: len(splits[s][1]) for s in SPLITS}
    assert sum(meta["counts"][s] for s in ("train", "val")) == len(fake_arrays["x_train"])
    np.testing.assert_array_equal(splits["test"][0], fake_arrays["x_test"])


def test_load_processed_missing_says_how_to_make_it(tmp_path):
    with pytest.raises(MnistDataError) as info:
        load_processed(tmp_path / "nothing")
    msg = str(info.value)
    assert "meta.json missing" in msg and "dvc repro preprocess" in msg, msg


# --- atomicity -----------------------------------------------------------------------------------


def _truncate(raw_dir: Path) -> None:
    p = raw_dir / "mnist.npz"
    p.write_bytes(p.read_bytes()[:1000])


@pytest.mark.parametrize(
    "failure, expected",
    [
        ("truncated_raw", "not a readable .npz archive"),
        ("val_size_zero", "data.val_size=0 does not fit the 600 training images"),
        ("val_size_too_big", "data.val_size=600 does not fit the 600 training images"),
        ("missing_raw", "No MNIST found"),
    ],
)
def test_failed_run_leaves_previous_output_untouched(tmp_path, fake_arrays, failure, expected):
    raw_dir, out = tmp_path / "data" / "raw", tmp_path / "data" / "processed"
    write_npz(raw_dir, fake_arrays)
    run_pp(raw_dir, out, val_size=100)
    before = snapshot(out)
    val_size = 100
    if failure == "truncated_raw":
        _truncate(raw_dir)
    elif failure == "missing_raw":
        (raw_dir / "mnist.npz").unlink()
    else:
        val_size = 0 if failure == "val_size_zero" else 600
    with pytest.raises(MnistDataError) as info:
        run_pp(raw_dir, out, val_size=val_size, seed=1)
    assert expected in str(info.value)
    assert snapshot(out) == before
    assert leftovers(out.parent) == []


@pytest.mark.parametrize("failure", ["truncated_raw", "val_size_too_big"])
def test_failed_first_run_creates_nothing(tmp_path, fake_arrays, failure):
    raw_dir, out = tmp_path / "data" / "raw", tmp_path / "data" / "processed"
    write_npz(raw_dir, fake_arrays)
    if failure == "truncated_raw":
        _truncate(raw_dir)
    with pytest.raises(MnistDataError):
        run_pp(raw_dir, out, val_size=10_000 if failure == "val_size_too_big" else 100)
    assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["raw"]


def _limit_file_size(limit: int):
    """RLIMIT_FSIZE in the child: the write that grows a file past `limit` bytes comes up short (EFBIG), as on a
    full disk. (Python ignores SIGXFSZ, so the process is not killed; the write fails.)"""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


# A crash at the worst moment, made exact: the preprocess process SIGKILLs itself right after its first file
# is on disk, so no cleanup of any kind can run.
_SIGNAL_AFTER_FIRST_FILE = """
import os, signal, sys
import numpy as np
from mnistlab.data import preprocess

save = np.save
def save_then_signal(*args, **kwargs):
    save(*args, **kwargs)
    os.kill(os.getpid(), signal.{signal})
np.save = save_then_signal
"""
_DIE_AFTER_FIRST_FILE = _SIGNAL_AFTER_FIRST_FILE.format(signal="SIGKILL") + """
preprocess.preprocess(sys.argv[1], sys.argv[2], val_size=100, split_seed=1, verify_checksums=False)
"""


@pytest.mark.parametrize("failure", ["disk_full_at_x_test", "sigkill_after_first_file"])
def test_failure_in_the_middle_of_the_write_keeps_the_old_output(tmp_path, failure):
    """A re-run that dies half-way through writing: the previous complete output stays, nothing partial looks
    complete, and the next run cleans up."""
    arrays = fake_mnist(n_train=600, n_test=1000)  # x_train.npy 392 kB is written first; x_test.npy is 784 kB
    raw_dir, out = tmp_path / "data" / "raw", tmp_path / "data" / "processed"
    write_npz(raw_dir, arrays)
    old_meta = run_pp(raw_dir, out, val_size=100, seed=0)
    before = snapshot(out)

    if failure == "disk_full_at_x_test":
        proc = subprocess.run(
            [str(BIN / "mnistlab-preprocess"), f"data.raw_dir={raw_dir}", f"data.processed_dir={out}",
             "data.verify_checksums=false", "data.val_size=100", "data.split_seed=1"],
            cwd=tmp_path, env=cli_env(PYTHONDONTWRITEBYTECODE="1"), capture_output=True, text=True, timeout=120,
            preexec_fn=_limit_file_size(600_000),
        )
        assert proc.returncode == 1 and "OSError" in proc.stderr, proc.stderr  # numpy: "784000 requested and 599872 written"
    else:
        proc = subprocess.run([sys.executable, "-c", _DIE_AFTER_FIRST_FILE, str(raw_dir), str(out)],
                              cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == -signal.SIGKILL, proc.stderr

    assert snapshot(out) == before, "the previous complete output must survive a failed write"
    assert load_processed(out)[1] == old_meta
    partial = [out.parent / name for name in leftovers(out.parent)]
    if failure == "sigkill_after_first_file":  # nothing could clean up: the half copy sits under a temp name
        (tmp,) = partial
        assert sorted(p.name for p in tmp.iterdir()) == ["x_train.npy"]
        with pytest.raises(MnistDataError, match="meta.json missing"):
            load_processed(tmp)
    else:
        assert partial == []
    meta = run_pp(raw_dir, out, val_size=100, seed=1)  # the next run succeeds and sweeps any leftover away
    assert meta["split_seed"] == 1 and load_processed(out)[1] == meta
    assert leftovers(out.parent) == []


def test_rerun_replaces_output_completely(tmp_path, fake_arrays):
    raw_dir, out = tmp_path / "data" / "raw", tmp_path / "data" / "processed"
    write_npz(raw_dir, fake_arrays)
    run_pp(raw_dir, out, val_size=100)
    (out / "stale.txt").write_text("left by someone")
    meta = run_pp(raw_dir, out, val_size=50)
    assert sorted(p.name for p in out.iterdir()) == FILES  # a swap, not an overwrite in place
    assert meta["counts"]["val"] == 50 and len(np.load(out / "y_val.npy")) == 50
    assert leftovers(out.parent) == []


# --- the CLI -------------------------------------------------------------------------------------


def cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "mnistlab-preprocess"), *overrides],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120,
    )


def assert_one_clean_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc  # bad input: exit 2
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_cli_missing_raw_dir(tmp_path):
    bad, out = tmp_path / "no_such_dir", tmp_path / "processed"
    proc = cli(tmp_path, f"data.raw_dir={bad}", f"data.processed_dir={out}")
    assert proc.returncode == 2
    msg = assert_one_clean_error(proc)
    assert str(bad) in msg and "dvc repro" in msg and "dvc remote modify --local mnist-source" in msg, msg
    assert not out.exists()


def test_cli_truncated_npz(tmp_path, fake_arrays):
    write_npz(tmp_path / "raw", fake_arrays)
    _truncate(tmp_path / "raw")
    out = tmp_path / "processed"
    proc = cli(tmp_path, f"data.raw_dir={tmp_path / 'raw'}", f"data.processed_dir={out}",
               "data.verify_checksums=false")
    msg = assert_one_clean_error(proc)
    assert "mnist.npz is not a readable .npz archive" in msg and "dvc update data.dvc" in msg, msg
    assert not out.exists()


def test_cli_fake_data_fails_verification_by_default(tmp_path, fake_arrays):
    write_npz(tmp_path / "raw", fake_arrays)
    out = tmp_path / "processed"
    proc = cli(tmp_path, f"data.raw_dir={tmp_path / 'raw'}", f"data.processed_dir={out}")
    msg = assert_one_clean_error(proc)
    assert "600 samples, MNIST has 60000" in msg and "verify_checksums: false" in msg, msg
    assert not out.exists()


def test_cli_success_with_verification_off(tmp_path, fake_arrays):
    write_npz(tmp_path / "raw", fake_arrays)
    out = tmp_path / "processed"
    proc = cli(tmp_path, "data.raw_dir=raw", "data.processed_dir=processed",
               "data.verify_checksums=false", "data.val_size=100", "data.split_seed=2")
    assert proc.returncode == 0, proc.stderr
    assert "preprocess: npz verified=False counts={'train': 500, 'val': 100, 'test': 200}" in proc.stdout
    meta = json.loads((out / META_NAME).read_text())  # relative paths resolve against the cwd (no project)
    assert meta["split_seed"] == 2 and meta["counts"]["val"] == 100
    assert meta["data_checksum"] in proc.stdout


# Ctrl-C at a fixed moment: the preprocess CLI sends itself a real SIGINT right after its first file is on disk.
_SIGINT_AFTER_FIRST_FILE = _SIGNAL_AFTER_FIRST_FILE.format(signal="SIGINT") + """
sys.argv = ["mnistlab-preprocess", *sys.argv[1:]]
preprocess.main()
"""


def test_ctrl_c_in_preprocess_says_so_in_one_message_and_keeps_the_old_output(tmp_path):
    """Ctrl-C during the write printed a 14-frame traceback; now one message with the exit status and the state of
    data/processed, exit 130, the previous split untouched."""
    raw_dir, out = tmp_path / "data" / "raw", tmp_path / "data" / "processed"
    write_npz(raw_dir, fake_mnist(n_train=600, n_test=200))
    old_meta = run_pp(raw_dir, out, val_size=100, seed=0)
    before = snapshot(out)
    proc = subprocess.run([sys.executable, "-c", _SIGINT_AFTER_FIRST_FILE, f"data.raw_dir={raw_dir}",
                           f"data.processed_dir={out}", "data.verify_checksums=false", "data.val_size=100",
                           "data.split_seed=1", "hydra.run.dir=.", "hydra.output_subdir=null"],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "mnistlab-preprocess: stopped by Ctrl-C; exit status 130." in proc.stderr
    assert f"{out} was not changed: the previous split is still in place." in proc.stderr
    assert snapshot(out) == before and load_processed(out)[1] == old_meta
