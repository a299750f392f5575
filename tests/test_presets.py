"""The two notebook presets, the validation-free mode they use, Keras' initialisation and the seed reproduction."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import PROJECT_ROOT, checkpoint_test_acc, compose, fast_overrides, read_csv, write_npz
from mnistlab.config import ConfigError, validate

BEGIN, END = "<!-- reproduce:begin -->", "<!-- reproduce:end -->"


def _optimizer(cfg):
    from mnistlab.model import MnistMLP

    return MnistMLP(OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.optimizer)).configure_optimizers()


def _common_lecture_setup(cfg):
    """What both notebooks share: Dense 512 relu -> 10, RMSprop lr 1e-3, 5 epochs on all 60k, last weights tested."""
    assert list(cfg.model.hidden_sizes) == [512] and cfg.model.activation == "relu" and cfg.model.dropout == 0
    assert cfg.trainer.max_epochs == 5 and cfg.data.validation is False and cfg.test_ckpt == "last"
    assert validate(cfg) is None


def test_chollet_is_the_books_keras_setup():
    cfg = compose(["experiment=chollet"])
    _common_lecture_setup(cfg)
    assert cfg.data.batch_size == 128 and cfg.model.init == "keras"
    opt = _optimizer(cfg)
    # keras.optimizers.RMSprop() defaults: learning_rate 1e-3, rho 0.9, epsilon 1e-7, momentum 0, centered False
    assert type(opt) is torch.optim.RMSprop
    assert {k: opt.defaults[k] for k in ("lr", "alpha", "eps", "momentum", "centered", "weight_decay")} == {
        "lr": 1e-3, "alpha": 0.9, "eps": 1e-7, "momentum": 0.0, "centered": False, "weight_decay": 0.0}


def test_pytorch_notebook_is_rmsprop_with_pytorchs_own_defaults():
    cfg = compose(["experiment=pytorch_notebook"])
    _common_lecture_setup(cfg)
    assert cfg.data.batch_size == 64 and cfg.data.eval_batch_size == 256 and cfg.model.init == "torch"
    opt = _optimizer(cfg)
    reference = torch.optim.RMSprop([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)  # the notebook's call
    assert type(opt) is torch.optim.RMSprop
    for k in ("lr", "alpha", "eps", "momentum", "centered", "weight_decay"):
        assert opt.defaults[k] == reference.defaults[k], k


def test_keras_init_is_glorot_uniform_with_zero_bias():
    from mnistlab.nets import MLP

    torch.manual_seed(0)
    keras = [m for m in MLP(784, [512], 10, "relu", 0.0, init="keras") if isinstance(m, torch.nn.Linear)]
    torch.manual_seed(0)
    torch_init = [m for m in MLP(784, [512], 10, "relu", 0.0) if isinstance(m, torch.nn.Linear)]
    for k, t in zip(keras, torch_init):
        fan_in, fan_out = k.in_features, k.out_features
        glorot = math.sqrt(6 / (fan_in + fan_out))
        assert torch.count_nonzero(k.bias) == 0 and torch.count_nonzero(t.bias) > 0
        assert glorot * 0.98 < k.weight.abs().max() <= glorot  # uniform on [-limit, limit]: the max is near it
        assert t.weight.abs().max() <= 1 / math.sqrt(fan_in)  # nn.Linear: kaiming_uniform(a=sqrt(5))
        assert k.weight.std().item() == pytest.approx(glorot / math.sqrt(3), rel=0.02)


def test_keras_rmsprop_divides_by_the_root_of_v_plus_eps():
    """One step from v = 0 on a large and a tiny gradient: Keras' form vs torch's, from the two formulas."""
    from mnistlab.optim import KerasRMSprop

    cfg = compose(["experiment=chollet", "optimizer=rmsprop_keras"])
    assert validate(cfg) is None and cfg.optimizer.alpha == 0.9 and cfg.optimizer.eps == 1e-7
    lr, rho, eps = cfg.optimizer.lr, cfg.optimizer.alpha, cfg.optimizer.eps
    g = torch.tensor([0.5, 1e-5], dtype=torch.float64)
    steps = {}
    for cls in (KerasRMSprop, torch.optim.RMSprop):
        w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        opt = cls([w], lr=lr, alpha=rho, eps=eps)
        w.grad = g.clone()
        opt.step()
        steps[cls] = -w.detach()
    v = (1 - rho) * g**2
    assert torch.allclose(steps[KerasRMSprop], lr * g / torch.sqrt(v + eps), rtol=1e-12)
    assert torch.allclose(steps[torch.optim.RMSprop], lr * g / (torch.sqrt(v) + eps), rtol=1e-12)
    ratio = steps[KerasRMSprop] / steps[torch.optim.RMSprop]
    assert ratio[0] == pytest.approx(1, abs=1e-5) and ratio[1] < 0.05  # equal for large gradients only
    with pytest.raises(ConfigError, match=r"optimizer\.momentum"):
        validate(compose(["optimizer=rmsprop_keras", "optimizer.momentum=0.9"]))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.validation=false", "callbacks=early_stopping"], "callbacks.early_stopping"),
        (["data.validation=no"], "data.validation"),
        (["model.init=xavier"], "model.init"),
    ],
)
def test_inconsistent_or_unknown_values_fail_at_start_up(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose(overrides))


def test_validation_free_trains_on_all_training_images_in_the_raw_order(tmp_path, fake_arrays):
    """Whatever the preprocess split, the validation-free train set is the raw 60k (here 600) in file order."""
    from mnistlab.data.datamodule import MnistDataModule
    from mnistlab.data.preprocess import preprocess

    write_npz(tmp_path / "raw", fake_arrays)
    for val_size, split_seed in ((100, 0), (37, 5)):
        out = tmp_path / f"processed-{val_size}"
        preprocess(tmp_path / "raw", out, val_size=val_size, split_seed=split_seed, verify_checksums=False)
        dm = MnistDataModule(out, batch_size=32, eval_batch_size=100, seed=0, validation=False)
        dm.setup()
        x, y = dm.split("train")
        assert torch.equal(y, torch.from_numpy(fake_arrays["y_train"]).long())
        assert torch.equal(x, torch.from_numpy(fake_arrays["x_train"]).reshape(600, -1).float() / 255)
        with pytest.raises(KeyError):
            dm.split("val")


def test_validation_free_run_logs_no_val_metrics_and_tests_the_last_weights(tmp_path, processed_dir):
    from mlflow import MlflowClient

    from mnistlab.train import train
    from mnistlab.tracking.store import default_tracking_uri

    # test_ckpt keeps its default "best": without validation there is none, so the last weights are tested
    metrics = train(compose(fast_overrides(tmp_path, processed_dir, epochs=3) + ["data.validation=false",
                                                                                  "logger.log_model=false"]))
    assert "val/acc_best" not in metrics and metrics["epochs"] == 3
    from mnistlab.metrics import TIMING_KEYS

    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved == {k: v for k, v in metrics.items() if k not in TIMING_KEYS}

    client = MlflowClient(default_tracking_uri(tmp_path / "mlruns"))
    (run,) = client.search_runs([client.get_experiment_by_name("mnistlab").experiment_id])
    assert run.info.status == "FINISHED"
    assert not [k for k in run.data.metrics if k.startswith("val/")], run.data.metrics
    assert run.data.params["validation"] == "False" and run.data.params["test_ckpt"] == "last"
    assert run.data.tags["mnistlab.validation"] == "false"
    assert len(client.get_metric_history(run.info.run_id, "train/acc")) == 3

    ckpts = tmp_path / "out" / "checkpoints"
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    kept = torch.load(ckpts / "best.ckpt", weights_only=True)  # the checkpoint callback's file: the last epoch too
    assert last["epoch"] == kept["epoch"] == 2
    assert metrics["test/acc"] == pytest.approx(checkpoint_test_acc(ckpts / "last.ckpt", processed_dir), abs=1e-6)


# ------------------------------------------------------------------------------------------------ reproduce
def test_reproduce_report_equals_a_direct_computation_from_the_runs(tmp_path, processed_dir):
    from mlflow import MlflowClient
    from scipy import stats

    from mnistlab.reproduce import PUBLISHED, rebuild, reproduce, results_table
    from mnistlab.tracking.store import default_tracking_uri
    from mnistlab.tracking.tags import PARENT_TAG

    overrides = [o for o in fast_overrides(tmp_path, processed_dir, epochs=3) if not o.startswith("paths.output_dir")]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold table\n{END}\noutro\n")
    report = reproduce(2, overrides + ["logger.log_model=false", "logger.plots=false"], tmp_path / "reports",
                       readme=readme)

    client = MlflowClient(default_tracking_uri(tmp_path / "mlruns"))
    parent = client.get_run(report["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == [
        "chollet seed=0", "chollet seed=1", "pytorch_notebook seed=0", "pytorch_notebook seed=1"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"reproduce.md", "reproduce.json"}

    saved = json.loads((tmp_path / "reports" / "reproduce.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(report["summary"]))
    assert (tmp_path / "reports" / "reproduce.md").read_text().count("| `chollet` |") >= 2
    for preset in ("chollet", "pytorch_notebook"):
        # straight from each run's own files (metrics.json, curves.csv), independent of MLflow
        dirs = sorted((tmp_path / "logs" / "reproduce").glob(f"*/{preset}-seed*"))
        assert len(dirs) == 2
        test = [json.loads((d / "metrics.json").read_text())["test/acc"] for d in dirs]
        train_hist = [[float(r["train/acc"]) for r in read_csv(d / "curves.csv")] for d in dirs]
        train = [h[-1] for h in train_hist]
        s = saved["summary"][preset]
        assert s["test/acc"]["mean"] == pytest.approx(np.mean(test), abs=1e-6)
        low, high = stats.t.interval(0.95, len(test) - 1, loc=np.mean(test), scale=stats.sem(test))
        assert s["test/acc"]["ci"] == pytest.approx([low, high], abs=1e-6)
        assert s["train/acc"]["mean"] == pytest.approx(np.mean(train), abs=1e-6)
        assert s["gap"]["mean"] == pytest.approx(np.mean(train) - np.mean(test), abs=1e-6)
        assert s["epoch_96"] == [next((i + 1 for i, v in enumerate(h) if v >= 0.96), None) for h in train_hist]
        assert s["test/acc published in ci"] == bool(low <= PUBLISHED[preset]["test/acc"] <= high)
    text = readme.read_text()
    assert text == f"intro\n{BEGIN}\n{results_table(saved['summary'])}{END}\noutro\n"
    # --parent: the same report again from MLflow alone, without training
    again = rebuild(report["parent_run_id"], overrides, tmp_path / "again", None)
    assert again["summary"] == report["summary"] and again["overrides"] == report["overrides"]


def test_reproduce_refuses_bad_flags_before_training(tmp_path, capsys):
    from mnistlab.reproduce import main

    for argv, needle in ((["--seeds", "1"], "--seeds 1"), (["--presets", "nope"], "--presets nope"),
                         (["--readme", str(tmp_path / "none.md")], "--readme")):
        with pytest.raises(SystemExit) as e:
            main([*argv, f"paths.root={tmp_path}", f"paths.mlruns_dir={tmp_path / 'mlruns'}"])
        assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "mlruns").exists(), "nothing may start"


def test_readme_results_table_is_generated_from_the_committed_report():
    from mnistlab.reproduce import results_table

    report = json.loads((PROJECT_ROOT / "reports" / "reproduce.json").read_text())
    # real MNIST, the presets' own epochs: nothing that changes what trains was overridden
    assert report["n_seeds"] >= 5 and not [o for o in report["overrides"] if o.startswith(("data.", "trainer.", "model"))]
    block = (PROJECT_ROOT / "README.md").read_text().split(BEGIN, 1)[1].split(END, 1)[0]
    assert block == "\n" + results_table(report["summary"]), "run `make reproduce` (it rewrites the README's table)"
