"""Models by `_target_` (issue 20): a net is a plain nn.Module in mnistlab.nets with a yaml in conf/model/; the one
LightningModule trains whichever is chosen, validation and the MLflow params follow what that net declares. (The stacked
launcher trains a model it cannot stack one by one, saying so: test_core's planner test.)"""

from __future__ import annotations

import pytest
import torch

from conftest import compose, fast_overrides, run_train, store_runs
from mnistlab.config import ConfigError, validate
from mnistlab.model import MnistMLP
from mnistlab.nets import MLP, SmallCNN


def test_the_cnn_trains_tracks_and_tests_end_to_end(tmp_path, processed_dir):
    """`python -m mnistlab.train model=cnn trainer.max_epochs=1`: a FINISHED run with the CNN's own params, its
    curves, test metrics, checkpoint and logged model; the checkpoint loads back into the CNN."""
    proc = run_train(tmp_path, *fast_overrides(tmp_path, processed_dir, epochs=1), "model=cnn", "trainer.max_epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, runs = store_runs(tmp_path / "mlruns")
    (run,) = runs
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert (p["model"], p["channels"], p["hidden"], p["dropout"]) == ("SmallCNN", "[16, 32]", "64", "0.0")
    assert "hidden_sizes" not in p and "activation" not in p
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/loss", "test/acc"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [1]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "curves.png", "confusion_matrix.png"} <= artifacts
    assert len(run.outputs.model_outputs) == 1  # the logged model (an MLflow 3 LoggedModel, not a run artifact)
    model = MnistMLP.load_from_checkpoint(tmp_path / "out" / "checkpoints" / "best.ckpt", map_location="cpu")
    assert isinstance(model.net, SmallCNN)
    assert model(torch.rand(3, 784)).shape == (3, 10)


def test_a_bad_model_setting_is_named_by_its_net(tmp_path, processed_dir):
    """Each net checks its own keys at start-up; an unknown _target_ is named with the fix."""
    base = fast_overrides(tmp_path, processed_dir)
    with pytest.raises(ConfigError, match=r"model\.channels=\[16\]: must be two channel counts"):
        validate(compose(base + ["model=cnn", "model.channels=[16]"]))
    with pytest.raises(ConfigError, match=r"model\.activation='swish': must be one of"):
        validate(compose(base + ["model.activation=swish"]))
    with pytest.raises(ConfigError, match=r"model\._target_='mnistlab\.nets\.Nope': no such net"):
        validate(compose(base + ["model._target_=mnistlab.nets.Nope"]))
    with pytest.raises(ConfigError, match=r"compile='fast': must be one of"):
        validate(compose(base + ["compile=fast"]))
    validate(compose(base + ["model=cnn"]))


def test_the_mlp_config_builds_the_same_net_as_before():
    """The book's net by _target_ draws the same initial weights as the MLP built from its arguments (and as a
    checkpoint's hyperparameters from before models had a _target_)."""
    cfg = compose(["model=mlp"])
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(3)
    by_target = MnistMLP(model, {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "name": "sgd"}).net
    torch.manual_seed(3)
    old = MnistMLP({k: v for k, v in model.items() if k not in ("_target_", "init")},
                   {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "name": "sgd"}).net
    torch.manual_seed(3)
    direct = MLP(784, [512], 10, "relu", 0.0)
    assert isinstance(by_target, MLP)
    for a, b, c in zip(by_target.state_dict().values(), old.state_dict().values(), direct.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
