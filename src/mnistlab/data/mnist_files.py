"""Read MNIST from `mnist.npz` (Keras layout) or the four IDX files, and verify it is the real MNIST.

Verification is on array content (sha256 of each array's C-order bytes, i.e. the IDX payload), not
on file bytes, so any faithful copy passes: a re-packed npz, gzipped or plain IDX files.
"""

from __future__ import annotations

import gzip
import hashlib
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Public facts about MNIST: sha256 of each array's raw bytes (equal to the IDX payload after its header).
CANONICAL_SHA256 = {
    "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}
EXPECTED_COUNTS = {"train": 60000, "test": 10000}
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
NPZ_NAME = "mnist.npz"
# torchvision's MNIST/raw file names, without the optional .gz suffix.
IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_UBYTE_MAGIC = {3: 2051, 1: 2049}  # ndim -> magic number of an unsigned-byte IDX file

FIX_MISSING = (
    "Run `dvc repro` (or `dvc update data.dvc`) to import it; offline, point the `mnist-source` DVC "
    "remote at a local copy first: `dvc remote modify --local mnist-source url /dir/with/mnist` "
    "(or `make repro MNIST_DIR=/dir/with/mnist`)."
)
FIX_CORRUPT = (
    "Re-import a good copy with `dvc update data.dvc` (or `dvc repro` after deleting the file)"
    ", or, for a deliberately different dataset, set `data.verify_checksums: false` in conf/data/."
)


class MnistDataError(Exception):
    """Raw MNIST is missing, unreadable or not MNIST; the message names the file and the fix."""


@dataclass(frozen=True)
class MnistArrays:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source_format: str  # "npz" or "idx"
    source_files: tuple[str, ...]

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in CANONICAL_SHA256}


def sha256_of(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _find_idx(raw_dir: Path, stem: str) -> Path | None:
    for folder in (raw_dir, raw_dir / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """Parse one unsigned-byte IDX file (plain or gzip).

    Hand-written because torchvision's reader takes only uncompressed files and fails with bare asserts.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise MnistDataError(f"{path} is not a readable IDX file ({e}). {FIX_CORRUPT}") from e
    if len(data) < 8:
        raise MnistDataError(f"{path} is too short to be an IDX file ({len(data)} bytes). {FIX_CORRUPT}")
    magic = int.from_bytes(data[:4], "big")
    ndim = data[3]
    if data[:2] != b"\x00\x00" or data[2] != 0x08 or _IDX_UBYTE_MAGIC.get(ndim) != magic:
        raise MnistDataError(
            f"{path} has IDX magic number {magic}, expected 2051 (images) or 2049 (labels) for "
            f"unsigned-byte MNIST data. {FIX_CORRUPT}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MnistDataError(
            f"{path} is truncated inside its IDX header ({len(data)} bytes, the header alone is "
            f"{header}). {FIX_CORRUPT}"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    payload = np.frombuffer(data, dtype=np.uint8, offset=header)
    if payload.size != int(np.prod(dims)):
        raise MnistDataError(
            f"{path} header declares shape {dims} ({int(np.prod(dims))} bytes) but holds "
            f"{payload.size} bytes of data: the file is truncated or corrupt. {FIX_CORRUPT}"
        )
    return payload.reshape(dims)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy saved under the .npz name
            raise MnistDataError(
                f"{path} is a single .npy array, not a .npz archive; a Keras-layout mnist.npz holds "
                f"x_train, y_train, x_test, y_test. {FIX_CORRUPT}"
            )
        with loaded as npz:
            missing = [k for k in CANONICAL_SHA256 if k not in npz.files]
            if missing:
                raise MnistDataError(
                    f"{path} lacks the array(s) {missing}; a Keras-layout mnist.npz holds "
                    f"x_train, y_train, x_test, y_test. {FIX_CORRUPT}"
                )
            arrays = {k: npz[k] for k in CANONICAL_SHA256}
        # NpzFile returns a member that is not in .npy format as raw bytes instead of failing.
        not_npy = [k for k, a in arrays.items() if not isinstance(a, np.ndarray)]
        if not_npy:
            raise MnistDataError(
                f"{path} member(s) {not_npy} are not .npy arrays; the archive is corrupt. {FIX_CORRUPT}"
            )
        return arrays
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError) as e:
        raise MnistDataError(
            f"{path} is not a readable .npz archive ({type(e).__name__}: {e}); it may be truncated "
            f"by an interrupted download. {FIX_CORRUPT}"
        ) from e


def load_raw(raw_dir: Path) -> MnistArrays:
    """Load raw MNIST from `raw_dir`: mnist.npz if present, else the four IDX files."""
    raw_dir = Path(raw_dir)
    npz = raw_dir / NPZ_NAME
    if npz.is_file():
        return MnistArrays(**_read_npz(npz), source_format="npz", source_files=(NPZ_NAME,))
    idx_paths = {k: _find_idx(raw_dir, stem) for k, stem in IDX_NAMES.items()}
    if all(idx_paths.values()):
        arrays = {k: read_idx(p) for k, p in idx_paths.items()}
        files = tuple(str(p.relative_to(raw_dir)) for p in idx_paths.values())
        return MnistArrays(**arrays, source_format="idx", source_files=files)
    missing = [IDX_NAMES[k] for k, p in idx_paths.items() if p is None]
    raise MnistDataError(
        f"No MNIST found in {raw_dir}/: expected {NPZ_NAME} (Keras layout) or the four IDX files "
        f"(missing: {', '.join(missing)}). {FIX_MISSING}"
    )


def validate(data: MnistArrays, verify_checksums: bool = True) -> dict[str, str]:
    """Check shapes, dtypes, counts and labels, then the content hashes; returns the actual hashes."""
    for split, count in EXPECTED_COUNTS.items():
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE:
            raise MnistDataError(
                f"x_{split} has shape {x.shape}, expected (N, 28, 28) images. {FIX_CORRUPT}"
            )
        if y.ndim != 1:
            raise MnistDataError(f"y_{split} has shape {y.shape}, expected (N,) labels. {FIX_CORRUPT}")
        if x.shape[0] != y.shape[0]:
            raise MnistDataError(
                f"{split} split has {x.shape[0]} images but {y.shape[0]} labels; they must match. "
                f"{FIX_CORRUPT}"
            )
        if x.dtype != np.uint8:
            raise MnistDataError(f"x_{split} has dtype {x.dtype}, expected uint8 pixels. {FIX_CORRUPT}")
        if not np.issubdtype(y.dtype, np.integer):
            raise MnistDataError(f"y_{split} has dtype {y.dtype}, expected integer labels. {FIX_CORRUPT}")
        if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
            raise MnistDataError(
                f"y_{split} has labels in [{y.min()}, {y.max()}], expected 0..9. {FIX_CORRUPT}"
            )
        if verify_checksums and x.shape[0] != count:
            raise MnistDataError(
                f"{split} split has {x.shape[0]} samples, MNIST has {count}. {FIX_CORRUPT}"
            )
    # Labels are hashed as uint8 (the IDX payload) so an npz that widened them still verifies.
    actual = {
        k: sha256_of(a if k.startswith("x_") else a.astype(np.uint8)) for k, a in data.arrays().items()
    }
    if verify_checksums:
        for name, expected in CANONICAL_SHA256.items():
            if actual[name] != expected:
                raise MnistDataError(
                    f"Checksum mismatch for {name}: expected sha256 {expected}, got {actual[name]}; "
                    f"this is not the canonical MNIST content. {FIX_CORRUPT}"
                )
    return actual
