"""The real `dvc` CLI on a copy of the project: import MNIST through the `mnist-source` remote, preprocess."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import SHARED_MNIST, dvc, fake_mnist, meta, redirect, require_real_mnist, run_in, set_params, write_npz

from mnistlab.data.mnist_files import CANONICAL_SHA256, sha256_of


def status(proj: Path, target: str) -> dict:
    return json.loads(dvc(proj, "status", "--json", target).stdout)


@pytest.fixture
def fake_source(tmp_path) -> tuple[Path, dict]:
    arrays = fake_mnist()
    write_npz(tmp_path / "mirror", arrays)
    return tmp_path / "mirror", arrays


def test_repro_imports_and_preprocesses_fake_mirror(project_copy, fake_source):
    proj, (mirror, arrays) = project_copy, fake_source
    params = set_params(proj, "data.verify_checksums=false", "data.val_size=100")
    assert params["data"]["verify_checksums"] is False and params["data"]["val_size"] == 100
    redirect(proj, mirror)
    assert "mnist-source" in (proj / ".dvc" / "config.local").read_text()
    assert run_in(proj, "git", "diff", "--quiet", ".dvc/config").returncode == 0  # the shared config untouched

    proc = dvc(proj, "repro", "preprocess")
    out = proc.stdout + proc.stderr
    assert "Importing 'remote://mnist-source/mnist.npz' -> 'data/raw/mnist.npz'" in out, out
    assert "Running stage 'preprocess'" in out, out
    assert "preprocess: npz verified=False counts={'train': 500, 'val': 100, 'test': 200}" in out, out

    assert (proj / "data" / "raw" / "mnist.npz").read_bytes() == (mirror / "mnist.npz").read_bytes()
    m = meta(proj)
    assert m["counts"] == {"train": 500, "val": 100, "test": 200}
    assert m["content_sha256"] == {k: sha256_of(v) for k, v in arrays.items()}
    assert m["verified"] is False
    assert sorted(p.name for p in (proj / "data").iterdir()) == ["processed", "raw"]  # no temp dirs left

    # The hashless import now records what it fetched; dvc.lock records the stage and its params.
    data_dvc = yaml.safe_load((proj / "data.dvc").read_text())
    assert re.fullmatch(r"[0-9a-f]{32}", data_dvc["deps"][0]["md5"])
    assert data_dvc["outs"][0]["md5"] == data_dvc["deps"][0]["md5"]
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]["preprocess"]
    assert lock["params"]["params.yaml"]["data.val_size"] == 100
    assert lock["params"]["params.yaml"]["data.verify_checksums"] is False
    assert lock["outs"][0]["path"] == "data/processed" and lock["outs"][0]["nfiles"] == 7

    assert status(proj, "preprocess") == {}
    assert status(proj, "data.dvc") == {}

    mtime = (proj / "data" / "processed" / "meta.json").stat().st_mtime_ns
    again = dvc(proj, "repro", "preprocess")
    out2 = again.stdout + again.stderr
    assert "'data.dvc' didn't change, skipping" in out2, out2
    assert "Stage 'preprocess' didn't change, skipping" in out2, out2
    assert "Running stage" not in out2 and "Importing" not in out2, out2
    assert (proj / "data" / "processed" / "meta.json").stat().st_mtime_ns == mtime


def test_param_change_reruns_only_preprocess(project_copy, fake_source):
    proj, (mirror, _) = project_copy, fake_source
    set_params(proj, "data.verify_checksums=false", "data.val_size=100")
    redirect(proj, mirror)
    dvc(proj, "repro", "preprocess")
    set_params(proj, "data.verify_checksums=false", "data.val_size=50", "data.split_seed=3")
    st = status(proj, "preprocess")
    assert "preprocess" in st, st
    proc = dvc(proj, "repro", "preprocess")
    out = proc.stdout + proc.stderr
    assert "'data.dvc' didn't change, skipping" in out and "Running stage 'preprocess'" in out, out
    m = meta(proj)
    assert m["counts"] == {"train": 550, "val": 50, "test": 200} and m["split_seed"] == 3


def test_changed_mirror_is_reimported(project_copy, fake_source):
    """data.dvc is an unfrozen import: new content at the remote is fetched by the next repro."""
    proj, (mirror, _) = project_copy, fake_source
    set_params(proj, "data.verify_checksums=false", "data.val_size=100")
    redirect(proj, mirror)
    dvc(proj, "repro", "preprocess")
    first = meta(proj)["data_checksum"]
    new = fake_mnist(n_train=400, n_test=100, seed=9)
    write_npz(mirror, new)
    proc = dvc(proj, "repro", "preprocess")
    out = proc.stdout + proc.stderr
    assert "Importing" in out and "Running stage 'preprocess'" in out, out
    m = meta(proj)
    assert m["data_checksum"] != first
    assert m["content_sha256"] == {k: sha256_of(v) for k, v in new.items()}
    assert m["counts"] == {"train": 300, "val": 100, "test": 100}


def test_empty_mirror_fails_naming_the_import(project_copy, tmp_path):
    proj = project_copy
    (tmp_path / "empty").mkdir()
    set_params(proj, "data.verify_checksums=false", "data.val_size=100")
    redirect(proj, tmp_path / "empty")
    lock_before = (proj / "dvc.lock").read_text() if (proj / "dvc.lock").exists() else None
    proc = dvc(proj, "repro", "preprocess", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "failed to reproduce 'data.dvc'" in out, out
    assert "remote://mnist-source/mnist.npz" in out and "does not exist" in out, out
    assert "Running stage 'preprocess'" not in out, out
    assert not (proj / "data" / "raw" / "mnist.npz").exists()
    assert not (proj / "data" / "processed").exists()
    assert ((proj / "dvc.lock").read_text() if (proj / "dvc.lock").exists() else None) == lock_before


def test_source_gone_after_import_recovers_from_cache(project_copy, fake_source, tmp_path):
    """Once imported, an unreachable source (offline, mirror moved) makes `dvc repro` fail; DVC then also
    removes data/raw/mnist.npz from the workspace (not asserted: DVC's behaviour), but the copy in
    .dvc/cache is intact: `dvc checkout data.dvc` restores it, and a frozen import repros offline."""
    proj, (mirror, _) = project_copy, fake_source
    set_params(proj, "data.verify_checksums=false", "data.val_size=100")
    redirect(proj, mirror)
    dvc(proj, "repro", "preprocess")
    raw = proj / "data" / "raw" / "mnist.npz"
    raw_bytes, processed_meta = raw.read_bytes(), meta(proj)

    (tmp_path / "gone").mkdir()
    redirect(proj, tmp_path / "gone")
    proc = dvc(proj, "repro", "preprocess", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "does not exist" in out, out
    assert meta(proj) == processed_meta  # the stage's output survives the failed import

    dvc(proj, "checkout", "data.dvc")
    assert raw.read_bytes() == raw_bytes
    dvc(proj, "freeze", "data.dvc")
    again = dvc(proj, "repro", "preprocess")
    assert "Stage 'preprocess' didn't change, skipping" in again.stdout + again.stderr
    assert raw.read_bytes() == raw_bytes


def test_fake_data_with_default_params_fails_verification(project_copy, fake_source):
    """With the committed params (verification on) a mirror that is not MNIST stops the stage."""
    proj, (mirror, _) = project_copy, fake_source
    redirect(proj, mirror)
    proc = dvc(proj, "repro", "preprocess", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "failed to reproduce 'preprocess'" in out, out
    assert "train split has 600 samples, MNIST has 60000" in out, out
    assert "Traceback" not in out, out
    assert (proj / "data" / "raw" / "mnist.npz").is_file()  # the import itself succeeded
    assert not (proj / "data" / "processed").exists()


def _readme_facts() -> tuple[dict[str, str], dict[str, list[int]]]:
    text = (SHARED_MNIST / "README.md").read_text()
    hashes = dict(re.findall(r"^\|\s*([xy]_(?:train|test))\s*\|\s*([0-9a-f]{64})\s*\|", text, re.M))
    counts = {
        split: [int(c) for c in m.split()]
        for split, m in re.findall(r"Class counts, (train|test): ([\d ]+)", text)
    }
    return hashes, counts


@pytest.mark.slow
def test_real_mnist_through_dvc(project_copy):
    require_real_mnist()
    proj = project_copy
    params = yaml.safe_load((proj / "params.yaml").read_text())["data"]
    assert params["verify_checksums"] is True and params["val_size"] == 5000  # the committed defaults
    redirect(proj, SHARED_MNIST)
    proc = dvc(proj, "repro", "preprocess")
    assert "verified=True" in proc.stdout, proc.stdout

    readme_hashes, readme_counts = _readme_facts()
    assert set(readme_hashes) == set(CANONICAL_SHA256)
    m = meta(proj)
    assert m["verified"] is True
    assert m["content_sha256"] == readme_hashes == CANONICAL_SHA256
    assert m["counts"] == {"train": 55000, "val": 5000, "test": 10000}
    assert m["class_counts"]["test"] == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert m["class_counts"]["test"] == readme_counts["test"]
    train_plus_val = [a + b for a, b in zip(m["class_counts"]["train"], m["class_counts"]["val"])]
    assert train_plus_val == readme_counts["train"]
    assert status(proj, "preprocess") == {}
