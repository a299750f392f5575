"""Real MNIST from ../shared/mnist (slow; CI runs them): verified preprocess, one epoch, the book's setup."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import PROJECT_ROOT, SHARED_MNIST, cli_env, compose, fast_overrides, require_real_mnist, run_train, store_runs

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
        "callbacks.finite_loss.check_every_n_steps=50", "logger.log_model=false",
    ]
    metrics = train(compose(overrides))
    assert metrics["test/acc"] > 0.95, metrics


# experiment=chollet, seed 42, one thread: test/acc by the CPU it was measured on
_SEED_42 = {"Intel(R) Xeon(R) Processor": (0.9791, 1e-3), "AMD EPYC": (0.9771, 1e-3)}


def _cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def test_the_books_setup_scores_what_the_readme_says(tmp_path, real_processed):
    """README: `python -m mnistlab.train experiment=chollet` (Keras' RMSprop defaults and init, batch 128, 5 epochs
    on all 60k training images, seed 42) reaches test/acc 0.9791 (the book: 0.9777) on the Intel Xeon it was first
    measured on, 0.9771 on an AMD EPYC: the same code, torch 2.14.1 and one thread, but the CPU's gemm kernels round
    differently and 5 epochs of RMSprop carry that into a few of the 10k test digits (b3d1c5a gives 0.9771 on the
    EPYC too). The torch thread count moves a few more, hence +-0.001 where the CPU was measured; elsewhere a run
    must land inside the seed-to-seed spread (0.9796 +- 0.0014 over seeds 0-4, README), +-0.004. One thread: with
    two, on this 2-core machine under a load of ~13, the old 55k preset did not finish in 300 s."""
    proc = run_train(
        PROJECT_ROOT, "experiment=chollet", f"data.processed_dir={real_processed}", f"paths.root={tmp_path}",
        f"paths.output_dir={tmp_path / 'out'}", f"paths.mlruns_dir={tmp_path / 'mlruns'}",
        "trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null", "logger.log_model=false",
        "logger.plots=false", "num_threads=1", timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["epochs"] == 5
    expected, tol = _SEED_42.get(_cpu_model(), (0.9791, 4e-3))
    assert metrics["test/acc"] == pytest.approx(expected, abs=tol), (_cpu_model(), metrics)
    _, (run,) = store_runs(tmp_path / "mlruns")
    p = run.data.params
    assert (p["optimizer"], p["lr"], p["alpha"], p["batch_size"], p["max_epochs"], p["seed"], p["hidden_sizes"]) == (
        "rmsprop", "0.001", "0.9", "128", "5", "42", "[512]")
    assert run.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])


def test_make_repro_with_an_empty_mirror_fails_with_the_offline_recipe(project_copy, tmp_path):
    """The README's offline recipe: a failed import says what happened and how to point DVC at a mirror."""
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        ["make", "-o", "setup", "repro", f"MNIST_DIR={empty}", f"VENV={PROJECT_ROOT / '.venv'}"],
        cwd=project_copy, env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]  # make's status when a recipe fails
    err = proc.stdout + proc.stderr
    assert "remote://mnist-source/mnist.npz" in err and "does not exist" in err
    assert "make repro MNIST_DIR=" in err and "dvc remote modify --local mnist-source url" in err
    assert not (project_copy / "data" / "processed").exists()
