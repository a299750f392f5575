"""Reading raw MNIST (npz and IDX) and verifying it: the happy paths, then every bad input's message."""

from __future__ import annotations

import gzip
import hashlib
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import IDX_NAMES, SHARED_MNIST, fake_mnist, idx_bytes, require_real_mnist, write_idx, write_npz

from mnistlab.data.mnist_files import (
    CANONICAL_SHA256,
    MnistArrays,
    MnistDataError,
    load_raw,
    read_idx,
    sha256_of,
    validate,
)

KEYS = ("x_train", "y_train", "x_test", "y_test")


def assert_same_arrays(data: MnistArrays, arrays: dict[str, np.ndarray]) -> None:
    for k in KEYS:
        got = getattr(data, k)
        assert got.dtype == np.uint8, k
        assert got.shape == arrays[k].shape, k
        np.testing.assert_array_equal(got, arrays[k], err_msg=k)


def raw_error(raw_dir: Path, verify: bool = False) -> str:
    """The MnistDataError message of loading + validating `raw_dir` (fails the test if none is raised)."""
    with pytest.raises(MnistDataError) as info:
        validate(load_raw(raw_dir), verify_checksums=verify)
    return str(info.value)


def assert_corrupt_fix(msg: str) -> None:
    """The message of a bad (present but unusable) file tells how to re-import it with DVC."""
    assert "dvc update data.dvc" in msg, msg


# --- happy paths ---------------------------------------------------------------------------------


def test_load_raw_npz(tmp_path, fake_arrays):
    write_npz(tmp_path, fake_arrays)
    data = load_raw(tmp_path)
    assert data.source_format == "npz"
    assert data.source_files == ("mnist.npz",)
    assert_same_arrays(data, fake_arrays)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("sub", ["", "MNIST/raw"], ids=["raw_dir", "torchvision_layout"])
def test_load_raw_idx(tmp_path, fake_arrays, gz, sub):
    write_idx(tmp_path / sub if sub else tmp_path, fake_arrays, gz=gz)
    data = load_raw(tmp_path)
    assert data.source_format == "idx"
    suffix = ".gz" if gz else ""
    prefix = f"{sub}/" if sub else ""
    assert data.source_files == tuple(f"{prefix}{IDX_NAMES[k]}{suffix}" for k in KEYS)
    assert_same_arrays(data, fake_arrays)


def test_npz_takes_precedence_over_idx(tmp_path, fake_arrays):
    other = fake_mnist(n_train=50, n_test=20, seed=7)
    write_npz(tmp_path, fake_arrays)
    write_idx(tmp_path, other)
    data = load_raw(tmp_path)
    assert data.source_format == "npz"
    assert data.x_train.shape[0] == fake_arrays["x_train"].shape[0]


def test_npz_and_idx_give_identical_arrays_and_hashes(tmp_path, fake_arrays):
    write_npz(tmp_path / "npz", fake_arrays)
    write_idx(tmp_path / "idx", fake_arrays, gz=True)
    from_npz, from_idx = load_raw(tmp_path / "npz"), load_raw(tmp_path / "idx")
    for k in KEYS:
        np.testing.assert_array_equal(getattr(from_npz, k), getattr(from_idx, k), err_msg=k)
    h_npz = validate(from_npz, verify_checksums=False)
    h_idx = validate(from_idx, verify_checksums=False)
    assert h_npz == h_idx
    # The hash is the IDX payload's sha256 (the file bytes after the header), as the docstring says.
    for k in KEYS:
        payload = idx_bytes(fake_arrays[k])[4 + 4 * fake_arrays[k].ndim :]
        assert h_idx[k] == hashlib.sha256(payload).hexdigest(), k


def test_widened_labels_hash_like_uint8(tmp_path, fake_arrays):
    """An npz that stores labels as int64 still hashes (and so verifies) like the uint8 IDX payload."""
    wide = dict(fake_arrays, y_train=fake_arrays["y_train"].astype(np.int64),
                y_test=fake_arrays["y_test"].astype(np.int64))
    write_npz(tmp_path, wide)
    data = load_raw(tmp_path)
    assert data.y_train.dtype == np.int64
    assert validate(data, verify_checksums=False) == {k: sha256_of(fake_arrays[k]) for k in KEYS}


def test_validate_without_verification_passes_on_fake_data(tmp_path, fake_arrays):
    write_npz(tmp_path, fake_arrays)
    hashes = validate(load_raw(tmp_path), verify_checksums=False)
    assert set(hashes) == set(KEYS)
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes.values())
    assert hashes == {k: sha256_of(fake_arrays[k]) for k in KEYS}
    assert all(hashes[k] != CANONICAL_SHA256[k] for k in KEYS)


def test_validate_with_verification_rejects_fake_sample_count(tmp_path, fake_arrays):
    write_npz(tmp_path, fake_arrays)
    msg = raw_error(tmp_path, verify=True)
    assert "train split has 600 samples" in msg and "60000" in msg, msg
    assert "verify_checksums" in msg, msg


def test_validate_with_verification_checksum_error_names_array_and_both_hashes():
    """MNIST-sized arrays of the wrong content get past the count check and fail on the hash."""
    arrays = {
        "x_train": np.zeros((60000, 28, 28), np.uint8),
        "y_train": np.zeros(60000, np.uint8),
        "x_test": np.zeros((10000, 28, 28), np.uint8),
        "y_test": np.zeros(10000, np.uint8),
    }
    data = MnistArrays(**arrays, source_format="npz", source_files=("mnist.npz",))
    with pytest.raises(MnistDataError) as info:
        validate(data, verify_checksums=True)
    msg = str(info.value)
    assert "Checksum mismatch for x_train" in msg, msg
    assert CANONICAL_SHA256["x_train"] in msg, msg
    assert sha256_of(arrays["x_train"]) in msg, msg
    assert "verify_checksums: false" in msg, msg
    # Without verification the same arrays pass and the hashes are reported.
    assert validate(data, verify_checksums=False)["y_test"] == sha256_of(arrays["y_test"])


# --- a missing raw file --------------------------------------------------------------------------


def test_missing_raw_says_how_to_import(tmp_path):
    with pytest.raises(MnistDataError) as info:
        load_raw(tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "mnist.npz" in msg, msg
    assert "dvc repro" in msg, msg
    assert "dvc remote modify --local mnist-source" in msg, msg
    for stem in IDX_NAMES.values():
        assert stem in msg, msg


def test_missing_one_idx_file_is_named(tmp_path, fake_arrays):
    write_idx(tmp_path, fake_arrays)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MnistDataError) as info:
        load_raw(tmp_path)
    msg = str(info.value)
    assert "(missing: t10k-labels-idx1-ubyte)" in msg, msg
    assert "dvc remote modify --local mnist-source" in msg, msg


# --- bad npz files -------------------------------------------------------------------------------


def test_truncated_npz(tmp_path, fake_arrays):
    path = write_npz(tmp_path, fake_arrays)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    msg = raw_error(tmp_path)
    assert str(path) in msg and "not a readable .npz archive" in msg and "truncated" in msg, msg
    assert_corrupt_fix(msg)


@pytest.mark.parametrize("content", [b"", b"<html><body>404 Not Found</body></html>\n"], ids=["empty", "html"])
def test_non_zip_npz(tmp_path, content):
    (tmp_path / "mnist.npz").write_bytes(content)
    msg = raw_error(tmp_path)
    assert "mnist.npz is not a readable .npz archive" in msg, msg
    assert_corrupt_fix(msg)


def test_npz_that_is_a_single_npy_array(tmp_path, fake_arrays):
    with open(tmp_path / "mnist.npz", "wb") as f:
        np.save(f, fake_arrays["x_train"])
    msg = raw_error(tmp_path)
    assert "mnist.npz is a single .npy array, not a .npz archive" in msg, msg
    assert_corrupt_fix(msg)


def test_npz_with_corrupt_compressed_member(tmp_path, fake_arrays):
    """Bit rot inside a deflate stream (the zip directory intact) is a data error, not a zlib traceback."""
    path = write_npz(tmp_path, fake_arrays)
    raw = bytearray(path.read_bytes())
    for i in range(200, 2000):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    msg = raw_error(tmp_path)
    assert "mnist.npz is not a readable .npz archive" in msg, msg
    assert_corrupt_fix(msg)


def test_npz_with_non_npy_members(tmp_path):
    with zipfile.ZipFile(tmp_path / "mnist.npz", "w") as z:
        for k in KEYS:
            z.writestr(f"{k}.npy", b"not an array")
    msg = raw_error(tmp_path)
    assert "are not .npy arrays" in msg and "x_train" in msg, msg
    assert_corrupt_fix(msg)


def test_npz_missing_a_key(tmp_path, fake_arrays):
    write_npz(tmp_path, {k: v for k, v in fake_arrays.items() if k != "y_test"})
    msg = raw_error(tmp_path)
    assert "mnist.npz lacks the array(s) ['y_test']" in msg, msg
    assert_corrupt_fix(msg)


# --- bad IDX files -------------------------------------------------------------------------------


@pytest.mark.parametrize("magic", [2052, 0x0D03, 0x12345678], ids=["off_by_one", "float_idx", "garbage"])
def test_idx_wrong_magic(tmp_path, fake_arrays, magic):
    write_idx(tmp_path, fake_arrays, gz=False)
    path = tmp_path / IDX_NAMES["x_train"]
    path.write_bytes(idx_bytes(fake_arrays["x_train"], magic=magic))
    msg = raw_error(tmp_path)
    assert f"{path} has IDX magic number {magic}" in msg and "2051" in msg, msg
    assert_corrupt_fix(msg)


def test_idx_truncated_payload(tmp_path, fake_arrays):
    write_idx(tmp_path, fake_arrays, gz=True)
    path = tmp_path / (IDX_NAMES["x_test"] + ".gz")
    with gzip.open(path, "wb") as f:
        f.write(idx_bytes(fake_arrays["x_test"])[:-1000])
    msg = raw_error(tmp_path)
    assert str(path) in msg and "truncated" in msg, msg
    assert "(200, 28, 28)" in msg, msg
    assert_corrupt_fix(msg)


def test_idx_truncated_inside_header(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((5, 28, 28), np.uint8))[:10])
    with pytest.raises(MnistDataError) as info:
        read_idx(path)
    msg = str(info.value)
    assert str(path) in msg and "truncated" in msg, msg


def test_idx_too_short(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08")
    with pytest.raises(MnistDataError) as info:
        read_idx(path)
    assert "too short to be an IDX file (3 bytes)" in str(info.value)


def test_idx_gzip_cut_short(tmp_path, fake_arrays):
    """A .gz cut mid-stream (an interrupted download) fails in gzip itself; still a clear data error."""
    write_idx(tmp_path, fake_arrays, gz=True)
    path = tmp_path / (IDX_NAMES["x_train"] + ".gz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    msg = raw_error(tmp_path)
    assert f"{path} is not a readable IDX file" in msg, msg
    assert_corrupt_fix(msg)


# --- structurally wrong arrays -------------------------------------------------------------------


def test_image_label_count_mismatch(tmp_path, fake_arrays):
    write_npz(tmp_path, dict(fake_arrays, y_train=fake_arrays["y_train"][:-1]))
    msg = raw_error(tmp_path)
    assert "train split has 600 images but 599 labels" in msg, msg
    assert_corrupt_fix(msg)


def test_image_label_count_mismatch_from_idx(tmp_path, fake_arrays):
    write_idx(tmp_path, dict(fake_arrays, y_test=fake_arrays["y_test"][:150]))
    msg = raw_error(tmp_path)
    assert "test split has 200 images but 150 labels" in msg, msg


@pytest.mark.parametrize("shape", [(600, 32, 32), (600, 784), (600, 28, 28, 1)])
def test_wrong_image_shape(tmp_path, fake_arrays, shape):
    x = np.zeros(shape, np.uint8)
    write_npz(tmp_path, dict(fake_arrays, x_train=x))
    msg = raw_error(tmp_path)
    assert f"x_train has shape {shape}, expected (N, 28, 28)" in msg, msg
    assert_corrupt_fix(msg)


def test_wrong_image_dtype(tmp_path, fake_arrays):
    write_npz(tmp_path, dict(fake_arrays, x_test=fake_arrays["x_test"].astype(np.float32) / 255))
    msg = raw_error(tmp_path)
    assert "x_test has dtype float32, expected uint8" in msg, msg


@pytest.mark.parametrize("bad", [10, 255, -1])
def test_label_out_of_range(tmp_path, fake_arrays, bad):
    y = fake_arrays["y_test"].astype(np.int16)
    y[17] = bad
    write_npz(tmp_path, dict(fake_arrays, y_test=y))
    msg = raw_error(tmp_path)
    assert "y_test has labels in" in msg and str(bad) in msg and "expected 0..9" in msg, msg
    assert_corrupt_fix(msg)


def test_wrong_sample_count_only_checked_with_verification(tmp_path):
    arrays = {
        "x_train": np.zeros((60000, 28, 28), np.uint8),
        "y_train": np.zeros(60000, np.uint8),
        "x_test": np.zeros((9999, 28, 28), np.uint8),
        "y_test": np.zeros(9999, np.uint8),
    }
    data = MnistArrays(**arrays, source_format="npz", source_files=("mnist.npz",))
    with pytest.raises(MnistDataError) as info:
        validate(data, verify_checksums=True)
    assert "test split has 9999 samples, MNIST has 10000" in str(info.value)
    assert set(validate(data, verify_checksums=False)) == set(KEYS)


# --- the real MNIST ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_npz():
    require_real_mnist()
    return load_raw(SHARED_MNIST)


@pytest.mark.slow
def test_real_mnist_npz_and_idx_verify_and_agree(real_npz, tmp_path):
    assert validate(real_npz, verify_checksums=True) == CANONICAL_SHA256
    idx_dir = tmp_path / "MNIST" / "raw"
    idx_dir.mkdir(parents=True)
    for stem in IDX_NAMES.values():
        (idx_dir / f"{stem}.gz").symlink_to(SHARED_MNIST / f"{stem}.gz")
    from_idx = load_raw(tmp_path)
    assert from_idx.source_format == "idx"
    assert validate(from_idx, verify_checksums=True) == CANONICAL_SHA256
    assert real_npz.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


@pytest.mark.slow
def test_real_mnist_with_one_label_changed_fails_checksum(real_npz):
    y = real_npz.y_train.copy()
    y[0] = (y[0] + 1) % 10
    tampered = MnistArrays(real_npz.x_train, y, real_npz.x_test, real_npz.y_test, "npz", ("mnist.npz",))
    with pytest.raises(MnistDataError) as info:
        validate(tampered, verify_checksums=True)
    msg = str(info.value)
    assert "Checksum mismatch for y_train" in msg and CANONICAL_SHA256["y_train"] in msg, msg
    assert sha256_of(y) in msg, msg
