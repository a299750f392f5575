"""The `preprocess` DVC stage: verify raw MNIST, split train/validation, write data/processed atomically."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from mnistlab.data.mnist_files import NUM_CLASSES, MnistDataError, load_raw, sha256_of, validate
from mnistlab.paths import CONF_DIR, project_root, resolve

SPLITS = ("train", "val", "test")
META_NAME = "meta.json"


def split_indices(n: int, val_size: int, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation indices (each in original order) from a seed."""
    perm = np.random.default_rng(split_seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def unsplit(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], val_size: int,
            split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of split_indices: train + val back in the raw file's order, whatever the split was."""
    n = train[1].shape[0] + val[1].shape[0]
    train_idx, val_idx = split_indices(n, val_size, split_seed)
    out = []
    for a, b in zip(train, val):
        whole = np.empty((n, *a.shape[1:]), dtype=a.dtype)
        whole[train_idx], whole[val_idx] = a, b
        out.append(whole)
    return out[0], out[1]


def data_checksum(hashes: dict[str, str]) -> str:
    """One short id for the dataset content, used as a run tag."""
    import hashlib

    joined = ",".join(f"{k}={hashes[k]}" for k in sorted(hashes))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Swap a complete `tmp` into `out_dir`; the old one is removed only after the new one is in place."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        if old.exists() and not out_dir.exists():  # put the previous good output back
            old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def preprocess(raw_dir: Path, out_dir: Path, val_size: int, split_seed: int, verify_checksums: bool = True) -> dict:
    """Verify `raw_dir`, write the splits + meta.json to `out_dir`; returns the meta dict."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    data = load_raw(raw_dir)
    hashes = validate(data, verify_checksums=verify_checksums)
    n_train = data.x_train.shape[0]
    if not 1 <= val_size < n_train:
        raise MnistDataError(
            f"data.val_size={val_size} does not fit the {n_train} training images; "
            f"set data.val_size in conf/data/ to 1..{n_train - 1}."
        )
    train_idx, val_idx = split_indices(n_train, val_size, split_seed)
    splits = {
        "train": (data.x_train[train_idx], data.y_train[train_idx]),
        "val": (data.x_train[val_idx], data.y_train[val_idx]),
        "test": (data.x_test, data.y_test),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, (x, y) in splits.items():
            np.save(tmp / f"x_{name}.npy", np.ascontiguousarray(x, dtype=np.uint8))
            np.save(tmp / f"y_{name}.npy", np.ascontiguousarray(y, dtype=np.uint8))
        x_tr = splits["train"][0]
        meta = {
            "source_format": data.source_format,
            "source_files": list(data.source_files),
            "content_sha256": hashes,
            "data_checksum": data_checksum(hashes),
            "verified": bool(verify_checksums),
            "val_size": val_size,
            "split_seed": split_seed,
            "counts": {s: int(splits[s][1].shape[0]) for s in SPLITS},
            "class_counts": {
                s: np.bincount(splits[s][1].astype(np.int64), minlength=NUM_CLASSES).tolist() for s in SPLITS
            },
            "pixel_mean": float(x_tr.mean() / 255.0),
            "pixel_std": float(x_tr.std() / 255.0),
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def read_data_checksum(processed_dir: Path) -> str:
    """The processed splits' content checksum, from meta.json, without loading the arrays."""
    return json.loads((Path(processed_dir) / META_NAME).read_text())["data_checksum"]


def load_processed(processed_dir: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """The splits as uint8 arrays plus meta.json; the error says how to produce them when missing."""
    processed_dir = Path(processed_dir)
    meta_path = processed_dir / META_NAME
    if not meta_path.is_file():
        raise MnistDataError(
            f"No processed data in {processed_dir}/ (meta.json missing). Run `dvc repro preprocess` "
            f"(or `python -m mnistlab.data.preprocess`) first."
        )
    meta = json.loads(meta_path.read_text())
    try:
        splits = {s: (np.load(processed_dir / f"x_{s}.npy"), np.load(processed_dir / f"y_{s}.npy")) for s in SPLITS}
    except (OSError, ValueError) as e:
        raise MnistDataError(
            f"{processed_dir}/ is incomplete or corrupt ({e}). Re-create it with `dvc repro preprocess` "
            f"(or `python -m mnistlab.data.preprocess`)."
        ) from e
    verify_processed(processed_dir, splits, meta)
    return splits, meta


def verify_processed(processed_dir: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict) -> None:
    """The arrays a run trains and tests on are the content preprocess hashed (meta.json), so a run never records a
    checksum it did not verify. 0.08 s for MNIST (measured on this 2-core machine)."""
    counts, recorded = meta.get("counts", {}), meta.get("content_sha256", {})
    changed = [f"{p}_{s}" for s in SPLITS for p, a in zip("xy", splits[s]) if a.shape[0] != counts.get(s)]  # wrong length
    if not changed:
        x_train, y_train = unsplit(splits["train"], splits["val"], meta["val_size"], meta["split_seed"])
        arrays = {"x_train": x_train, "y_train": y_train, "x_test": splits["test"][0], "y_test": splits["test"][1]}
        changed = [k for k, a in arrays.items() if sha256_of(a.astype(np.uint8, copy=False)) != recorded.get(k)]
    if data_checksum(recorded) != meta.get("data_checksum"):
        changed.append("meta.json's data_checksum")
    if changed:
        raise MnistDataError(
            f"{processed_dir}/ does not hold the data preprocess wrote: {', '.join(changed)} no longer match the "
            f"sha256 recorded in meta.json (a file was changed or damaged after preprocess). Nothing was started. "
            f"Restore it with `dvc checkout data/processed`, or re-create it with `dvc repro preprocess` (or "
            f"`python -m mnistlab.data.preprocess`)."
        )


def run(data_cfg, root: Path) -> dict:
    """Entry-point body: resolves paths against `root`, times the stage, prints a one-line summary."""

    start = time.perf_counter()
    meta = preprocess(
        resolve(data_cfg.raw_dir, root),
        resolve(data_cfg.processed_dir, root),
        val_size=data_cfg.val_size,
        split_seed=data_cfg.split_seed,
        verify_checksums=data_cfg.verify_checksums,
    )
    print(
        f"preprocess: {meta['source_format']} verified={meta['verified']} counts={meta['counts']} "
        f"checksum={meta['data_checksum']} in {time.perf_counter() - start:.2f}s"
    )
    return meta


def recovery_hint(processed_dir: Path) -> str:
    """What a failed preprocess left behind and how to get back (the DVC out is `persist`, so DVC kept it too)."""
    if (processed_dir / META_NAME).is_file():
        state = f"{processed_dir} was not changed: the previous split is still in place."
    else:
        state = f"There is no split in {processed_dir}."
    return (f"{state} Fix the source and re-run; `dvc checkout data/processed` restores the split recorded in "
            f"dvc.lock, `git checkout data.dvc dvc.lock && dvc checkout` the whole last committed data state.")


def main() -> None:
    import hydra

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def _main(cfg) -> None:
        root = project_root()
        try:
            run(cfg.data, root)
        except MnistDataError as e:
            print(f"error: {e} {recovery_hint(resolve(cfg.data.processed_dir, root))}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:  # one line, as train prints, not a traceback
            print(f"mnistlab-preprocess: stopped by Ctrl-C; exit status 130. "
                  f"{recovery_hint(resolve(cfg.data.processed_dir, root))}", file=sys.stderr)
            sys.exit(130)

    _main()


if __name__ == "__main__":
    main()
