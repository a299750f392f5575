"""One test per README claim that had none: unique run names, the logged model's signature and input example,
the FAILED run's description, the gpu/ddp presets, the offline failure with the default source, early stopping.
(The book's setup on real MNIST is in test_real_data.py, next to the real data.)"""

from __future__ import annotations

import json
import socket
import subprocess

import hydra
import numpy as np
import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from conftest import PROJECT_ROOT, cli_env, compose, fake_mnist, fast_overrides, run_train, store_runs, write_npz
from mnistlab.config import problems
from mnistlab.tracking.store import default_tracking_uri
from mnistlab.train import train

QUICK = ["logger.plots=false", "logger.log_checkpoint=false"]


@pytest.fixture(scope="module")
def two_runs_of_one_config(tmp_path_factory, processed_dir):
    """The same config trained twice into one store; the first logs the model."""
    tmp = tmp_path_factory.mktemp("twice")
    overrides = fast_overrides(tmp, processed_dir, epochs=1) + QUICK
    train(compose(overrides))
    train(compose(overrides + ["logger.log_model=false"]))
    client, runs = store_runs(tmp / "mlruns")
    return tmp, client, sorted(runs, key=lambda r: r.info.start_time)


def test_two_runs_of_one_config_get_distinct_names(two_runs_of_one_config):
    _, _, (first, second) = two_runs_of_one_config
    assert first.info.run_name == "rmsprop lr=0.001 bs=32"
    assert second.info.run_name == "rmsprop lr=0.001 bs=32 #2"


def test_logged_model_has_its_signature_and_input_example(two_runs_of_one_config, processed_dir):
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from mnistlab.tracking.run import fluent_uri

    tmp, _, (first, _) = two_runs_of_one_config
    uri = f"runs:/{first.info.run_id}/model"
    with fluent_uri(default_tracking_uri(tmp / "mlruns")):
        info = mlflow.models.get_model_info(uri)
        example = Model.load(uri).load_input_example(uri)
        pyfunc = mlflow.pyfunc.load_model(uri)
        (inp,), (out,) = info.signature.inputs.inputs, info.signature.outputs.inputs
        assert (inp.type, inp.shape) == (np.dtype("float32"), (-1, 784))
        assert (out.type, out.shape) == (np.dtype("float32"), (-1, 10))
        # the example is the first test digits exactly as the model sees them: flattened, scaled to [0, 1]
        x_test = np.load(processed_dir / "x_test.npy")
        np.testing.assert_array_equal(example, x_test[:5].reshape(5, -1).astype(np.float32) / np.float32(255))
        assert pyfunc.predict(example).shape == (5, 10)
        with pytest.raises(MlflowException, match="shape"):  # the signature is enforced on serving
            pyfunc.predict(example[:, :100])


@pytest.mark.slow
def test_failed_cli_run_is_failed_with_the_error_as_its_description(tmp_path, processed_dir):
    proc = run_train(PROJECT_ROOT, *fast_overrides(tmp_path, processed_dir), "optimizer=sgd", "optimizer.lr=1e30", *QUICK)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "NonFiniteLossError" in proc.stderr
    client, (run,) = store_runs(tmp_path / "mlruns")
    assert run.info.status == "FAILED"
    note = run.data.tags["mlflow.note.content"]  # what the MLflow UI shows as the run's description
    assert note.startswith("**FAILED**: NonFiniteLossError: Training loss became") and "lr=1e+30" in note, note
    assert note.endswith(run.data.tags["mnistlab.error"])
    error_txt = open(client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path))).read()
    assert error_txt.startswith("Traceback") and "NonFiniteLossError" in error_txt
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_gpu_preset_builds_a_trainer():
    """trainer=gpu asks Lightning for one GPU. Without one here, it is built with the CPU swapped in: every
    other key is a valid Trainer argument (a real GPU run is not part of the suite)."""
    cfg = compose(["trainer=gpu"])
    assert problems(cfg) == []
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.precision) == ("gpu", 1, "32-true")
    trainer = hydra.utils.instantiate(cfg.trainer, accelerator="cpu", logger=False)
    assert isinstance(trainer, Trainer) and isinstance(trainer.strategy, SingleDeviceStrategy)
    assert trainer.max_epochs == cfg.trainer.max_epochs and trainer.num_devices == 1


def test_ddp_preset_builds_a_two_process_ddp_trainer():
    """trainer=ddp with the CPU swapped in: the Trainer has Lightning's DDP strategy over 2 processes. Building it
    launches nothing; a multi-GPU DDP fit is not run here."""
    cfg = compose(["trainer=ddp"])
    assert problems(cfg) == []
    assert (cfg.trainer.accelerator, cfg.trainer.strategy, cfg.trainer.devices) == ("gpu", "ddp", 2)
    trainer = hydra.utils.instantiate(cfg.trainer, accelerator="cpu", logger=False)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert (trainer.num_devices, trainer.world_size, len(trainer.strategy.parallel_devices)) == (2, 2, 2)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_make_repro_offline_with_the_default_source_fails_at_once_with_the_hint(project_copy):
    """No MNIST_DIR, the committed public URL, no route to it: the import fails and the hint says what to do.
    The route is cut by a proxy that refuses connections (DVC's HTTP client honours HTTPS_PROXY), so the test
    means the same on a machine that has internet."""
    dead = f"http://127.0.0.1:{_closed_port()}"
    proc = subprocess.run(
        ["make", "-o", "setup", "repro", f"VENV={PROJECT_ROOT / '.venv'}"], cwd=project_copy,
        env=cli_env(HTTPS_PROXY=dead, https_proxy=dead, HTTP_PROXY=dead, http_proxy=dead),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]  # make's status when a recipe fails
    err = proc.stdout + proc.stderr
    assert not (project_copy / ".dvc" / "config.local").exists(), "no mirror was configured"
    assert "failed to reproduce 'data.dvc'" in err, err
    assert "could not download mnist.npz from the `mnist-source` DVC remote " \
           "(https://storage.googleapis.com/tensorflow/tf-keras-datasets)" in err, err
    assert "make repro MNIST_DIR=/path/to/mnist" in err and "dvc remote modify --local mnist-source url" in err
    assert "Traceback" not in err and "Running stage 'preprocess'" not in err
    assert not (project_copy / "data" / "raw" / "mnist.npz").exists()
    assert not (project_copy / "data" / "processed").exists()


def test_early_stopping_stops_when_val_acc_stops_improving(tmp_path):
    """Validation digits that are all the same blank image, labelled 0..9 evenly: whatever the model learns,
    val/acc is exactly 0.1 every epoch, so callbacks=early_stopping stops after `patience` epochs without gain."""
    from mnistlab.data.preprocess import preprocess, split_indices

    arrays = fake_mnist()
    _, val_idx = split_indices(len(arrays["y_train"]), 100, 0)
    arrays["x_train"][val_idx] = 0
    arrays["y_train"][val_idx] = np.arange(100) % 10
    write_npz(tmp_path / "raw", arrays)
    preprocess(tmp_path / "raw", tmp_path / "processed", val_size=100, split_seed=0, verify_checksums=False)

    cfg = compose(fast_overrides(tmp_path, tmp_path / "processed", epochs=20) + ["callbacks=early_stopping", "logger=none"])
    metrics = train(cfg)
    patience = cfg.callbacks.early_stopping.patience
    assert metrics["epochs"] == 1 + patience < cfg.trainer.max_epochs
    curves = (tmp_path / "out" / "curves.csv").read_text().splitlines()[1:]
    assert [float(row.split(",")[4]) for row in curves] == [0.1] * (1 + patience)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["epochs"] == 1 + patience
