"""Shared fixtures: small generated MNIST-shaped data (npz and IDX), a copy of the project in a temp git repo."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARED_MNIST = Path(os.environ.get("MNISTLAB_SHARED_MNIST", PROJECT_ROOT.parent / "shared" / "mnist"))
# CI (.ci/run) sets this: a test that would skip (real data or a tool missing) fails instead.
REQUIRE_ALL = os.environ.get("MNISTLAB_REQUIRE_ALL") == "1"
# Under pytest-xdist (`make test`) the workers share the cores: each gets its share of torch threads, and idle
# OpenMP threads sleep instead of spinning (spinning threads of two workers' trials starve each other).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def require_real_mnist() -> None:
    """Skip the calling test when ../shared/mnist is missing (a failure under MNISTLAB_REQUIRE_ALL=1)."""
    if not (SHARED_MNIST / "mnist.npz").is_file():
        pytest.skip(f"no real MNIST at {SHARED_MNIST}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under MNISTLAB_REQUIRE_ALL=1 every skip (missing data, a skipif marker, importorskip) is a failure.
    Hand-written: pytest has no option that turns skips into failures."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped, but MNISTLAB_REQUIRE_ALL=1 (CI) allows no skips: {reason}"


@pytest.fixture(autouse=True)
def _sigint_raises():
    """Each test starts with Python's own Ctrl-C handler: in-process launcher code may leave SIGINT ignored, and a
    subprocess inherits an ignored SIGINT (then a Ctrl-C test's child never sees it)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


def pytest_collection_modifyitems(config, items):
    """For pytest-xdist: the cluster tests share one worker (one SLURM + PostgreSQL per session), and the tests
    with a long timeout start first so they do not make the run's tail."""
    for item in items:
        if item.get_closest_marker("cluster"):
            item.add_marker(pytest.mark.xdist_group("cluster"))
    items.sort(key=lambda item: -(item.get_closest_marker("timeout").args[0]
                                  if item.get_closest_marker("timeout") else 0))


def fake_mnist(n_train: int = 600, n_test: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    """Learnable but not trivial MNIST-shaped arrays: each digit lights its own faint band of rows over
    strong noise, and 10% of the labels are wrong, so accuracy is high but below 1 and moves with training."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 140, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):
            x[i, 2 * c + 3 : 2 * c + 6, 4:24] += 100
        flip = rng.random(n) < 0.1
        y[flip] = rng.integers(0, 10, int(flip.sum()))
        return x, y

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def write_npz(folder: Path, arrays: dict[str, np.ndarray], name: str = "mnist.npz") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / name, **arrays)
    return folder / name


IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def idx_bytes(a: np.ndarray, magic: int | None = None) -> bytes:
    magic = magic if magic is not None else (2051 if a.ndim == 3 else 2049)
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    return header + np.ascontiguousarray(a, dtype=np.uint8).tobytes()


def write_idx(folder: Path, arrays: dict[str, np.ndarray], gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in IDX_NAMES.items():
        data = idx_bytes(arrays[key])
        if gz:
            with gzip.open(folder / f"{stem}.gz", "wb") as f:
                f.write(data)
        else:
            (folder / stem).write_bytes(data)
    return folder


@pytest.fixture(scope="session")
def fake_arrays() -> dict[str, np.ndarray]:
    return fake_mnist()


@pytest.fixture(scope="session")
def processed_dir(tmp_path_factory, fake_arrays) -> Path:
    """data/processed made by the real preprocess from the fake npz (checksums off: it is not MNIST)."""
    from mnistlab.data.preprocess import preprocess

    base = tmp_path_factory.mktemp("fixture_data")
    write_npz(base / "raw", fake_arrays)
    preprocess(base / "raw", base / "processed", val_size=100, split_seed=0, verify_checksums=False)
    return base / "processed"


def tracked_files() -> list[str]:
    """The project's files as a clean clone has them: tracked plus new-but-not-ignored files."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\n")
    return [f for f in out if f and (PROJECT_ROOT / f).is_file()]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def project_copy(tmp_path) -> Path:
    """The project's files in a fresh git repo (one commit), like a clean clone."""
    dest = tmp_path / "proj"
    for rel in tracked_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / rel, target)
    git(dest, "init", "-q")
    git(dest, "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    git(dest, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    return dest


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for CLI subprocesses: the venv first on PATH, 1 torch thread, no stray tracking URI."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MNISTLAB_PARENT_RUN_ID", "MNISTLAB_ROOT", "MNISTLAB_PARALLEL_TRIALS")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HYDRA_FULL_ERROR"] = "1"
    env.update(extra)
    return env


def compose(overrides: list[str]):
    """The composed config exactly as `python -m mnistlab.train` would see it (without Hydra's run node)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mnistlab.paths import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def fast_overrides(tmp: Path, processed: Path, epochs: int = 2) -> list[str]:
    """A seconds-long CPU run on fixture data, writing only under `tmp`."""
    return [
        f"data.processed_dir={processed}",
        "data.val_size=100",
        "data.batch_size=32",
        "data.eval_batch_size=100",
        f"trainer.max_epochs={epochs}",
        "trainer.log_every_n_steps=4",
        "trainer.enable_progress_bar=false",
        "callbacks.rich_progress_bar=null",
        "callbacks.finite_loss.check_every_n_steps=1",
        f"paths.root={tmp}",
        f"paths.output_dir={tmp / 'out'}",
        f"paths.mlruns_dir={tmp / 'mlruns'}",
        f"paths.sweep_reports_dir={tmp / 'reports'}",
        "num_threads=1",
    ]


def run_train(cwd: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m mnistlab.train <overrides>` as a real process in `cwd`."""
    return subprocess.run([sys.executable, "-m", "mnistlab.train", *overrides], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def store_runs(mlruns: Path, experiment: str = "mnistlab") -> tuple:
    """(client, every run of `experiment`) in the SQLite store under `mlruns`."""
    from mlflow import MlflowClient

    from mnistlab.tracking.store import default_tracking_uri

    client = MlflowClient(default_tracking_uri(mlruns))
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id], max_results=1000) if exp else [])


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint_test_acc(ckpt: Path, processed: Path) -> float:
    """The test accuracy of a checkpoint's weights on the test split, computed here in one plain pass: an independent
    check of the number a run's own test loop (Lightning, DDP, a stacked member) recorded."""
    import torch  # here, not at the top: torch reads OMP_NUM_THREADS (set above) when first imported

    from mnistlab.data.datamodule import MnistDataModule
    from mnistlab.model import MnistMLP

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = MnistMLP(**state["hyper_parameters"])
    model.load_state_dict(state["state_dict"])
    dm = MnistDataModule(processed, 32, 100, 0, validation=False)
    dm.setup()
    x, y = dm.split("test")
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def run_in(proj: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """A command as a real process in `proj`, with the CLI environment."""
    return subprocess.run(list(args), cwd=proj, env=cli_env(), capture_output=True, text=True, timeout=timeout)


# --- the real DVC CLI in a project copy ---

def dvc(proj: Path, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = run_in(proj, str(BIN / "dvc"), *args, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def set_params(proj: Path, *overrides: str) -> dict:
    """Recompose params.yaml with overrides, the way the project does (`python -m mnistlab.params`)."""
    import yaml

    proc = run_in(proj, sys.executable, "-m", "mnistlab.params", *overrides)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load((proj / "params.yaml").read_text())


def redirect(proj: Path, url: str | Path) -> None:
    dvc(proj, "remote", "modify", "--local", "mnist-source", "url", str(url))


def meta(proj: Path) -> dict:
    return json.loads((proj / "data" / "processed" / "meta.json").read_text())


# --- real Hydra multiruns of the training CLI ---

LAUNCHERS = {
    "basic": ["launcher=basic"],
    "joblib": ["launcher=joblib", "hydra.launcher.n_jobs=2"],
    "submitit_local": ["launcher=submitit_local"],
}


def multirun(tmp: Path, processed: Path, grid: list[str], launcher: list[str], timeout=600, sweep_dir="multirun"):
    """A seconds-long `python -m mnistlab.train -m` sweep on fixture data, writing only under `tmp`."""
    args = [
        sys.executable, "-m", "mnistlab.train", "-m", *launcher, *grid,
        f"data.processed_dir={processed}", "data.val_size=100", "data.batch_size=32", "data.eval_batch_size=100",
        "trainer.max_epochs=2", "trainer.log_every_n_steps=4", "callbacks.finite_loss.check_every_n_steps=1",
        f"paths.root={tmp}", f"paths.mlruns_dir={tmp / 'mlruns'}", f"paths.sweep_reports_dir={tmp / 'reports'}",
        f"hydra.sweep.dir={tmp / sweep_dir}", "logger.log_model=false",
        "trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null",
    ]
    return subprocess.run(args, cwd=PROJECT_ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def sweep_store(tmp: Path) -> tuple:
    """(client, parent runs, child runs) of the store a multirun under `tmp` wrote."""
    from mlflow import MlflowClient

    from mnistlab.tracking.store import default_tracking_uri

    client = MlflowClient(default_tracking_uri(tmp / "mlruns"))
    exp = client.get_experiment_by_name("mnistlab")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("mnistlab.sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children
