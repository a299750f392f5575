"""Real MNIST from ../shared/mnist (slow; CI runs them): verified preprocess and one epoch of the book's setup."""

from __future__ import annotations

import subprocess

import pytest

from conftest import PROJECT_ROOT, SHARED_MNIST, cli_env, compose, fast_overrides, require_real_mnist

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _real_mnist():
    require_real_mnist()


@pytest.fixture(scope="module")
def real_processed(tmp_path_factory):
    from mnistlab.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("real") / "processed"
    meta = preprocess(SHARED_MNIST, out, val_size=5000, split_seed=0, verify_checksums=True)
    assert meta["counts"] == {"train": 55000, "val": 5000, "test": 10000}
    return out


def test_one_epoch_on_real_mnist_beats_95_percent(tmp_path, real_processed):
    from mnistlab.train import train

    overrides = fast_overrides(tmp_path, real_processed, epochs=1) + [
        "data.val_size=5000", "data.batch_size=128", "data.eval_batch_size=1000", "trainer.log_every_n_steps=50",
        "callbacks.finite_loss.check_every_n_steps=50", "num_threads=null", "logger.log_model=false",
    ]
    metrics = train(compose(overrides))
    assert metrics["test/acc"] > 0.95, metrics


def test_make_repro_with_an_empty_mirror_fails_with_the_offline_recipe(project_copy, tmp_path):
    """The README's offline recipe: a failed import says what happened and how to point DVC at a mirror."""
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        ["make", "-o", "setup", "repro", f"MNIST_DIR={empty}", f"VENV={PROJECT_ROOT / '.venv'}"],
        cwd=project_copy, env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "remote://mnist-source/mnist.npz" in err and "does not exist" in err
    assert "make repro MNIST_DIR=" in err and "dvc remote modify --local mnist-source url" in err
    assert not (project_copy / "data" / "processed").exists()
