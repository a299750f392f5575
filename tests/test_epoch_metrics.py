"""Issue 13: the training epoch's metrics are on-device sums now (no torchmetrics call per step); every metric of a
5-epoch default run must be what it was, for the same seed.

Two checks, either can fail on its own:
- golden values: the MLflow metric histories and metrics.json of this exact run, recorded with the code BEFORE the
  change (main at cd38e7b, torchmetrics MeanMetric + MulticlassAccuracy per training step) on the project's 2-core
  dev machine (torch 2.14 CPU, num_threads=1). Accuracies are count ratios and must be equal; losses are float32 and
  are compared to 1e-6 relative, so that another CPU's kernels (a different summation order in a matmul) do not fail
  a test about the averaging.
- an independent computation: a callback feeds the same batches, through the same weights right before each
  optimizer step, to fresh torchmetrics objects (MeanMetric of the batch losses, micro MulticlassAccuracy), exactly
  what the module did per step before the change, and the logged train/loss and train/acc must equal them.
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from conftest import compose, fast_overrides, store_runs
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

# Recorded from the pre-change code (see the module docstring): {metric: [(step, value), ...]}.
GOLDEN_HISTORY = {
    "train/acc": [(1, 0.394), (2, 0.832), (3, 0.902), (4, 0.918), (5, 0.908)],
    "train/loss": [(1, 1.9631903), (2, 1.1276484), (3, 0.7095147), (4, 0.53301674), (5, 0.44700372)],
    "val/acc": [(1, 0.69), (2, 0.83), (3, 0.9), (4, 0.9), (5, 0.9)],
    "val/loss": [(1, 1.5694685), (2, 1.0695393), (3, 0.7079838), (4, 0.7061925), (5, 0.5914431)],
    "val/acc_best": [(1, 0.69), (2, 0.83), (3, 0.9), (4, 0.9), (5, 0.9)],  # once per epoch (the stray (80, 0.9) went)
    "test/acc": [(6, 0.905)],
    "test/loss": [(6, 0.66157484)],
    "train/loss_step": [
        (3, 2.161075), (7, 1.8994585), (11, 1.6052992), (15, 1.6353334), (19, 1.2375817), (23, 1.0034406),
        (27, 0.91018105), (31, 0.78710943), (35, 0.62257767), (39, 0.87507594), (43, 0.6792952), (47, 0.3839845),
        (51, 0.5826302), (55, 0.673494), (59, 0.49361113), (63, 0.85635865), (67, 0.4255843), (71, 0.39537814),
        (75, 0.18003097), (79, 0.1281302),
    ],
}
GOLDEN_SUMMARY = {"test/acc": 0.905, "test/loss": 0.66157484, "val/acc_best": 0.9, "epochs": 5, "samples_seen": 2500}


class Recompute(pl.Callback):
    """The pre-change computation, on the side: torchmetrics over the same batches and the same weights."""

    last: "Recompute | None" = None

    def __init__(self):
        self.loss, self.acc = MeanMetric(), MulticlassAccuracy(num_classes=10, average="micro")
        self.epochs: list[tuple[float, float]] = []
        Recompute.last = self

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            logits = pl_module(x)
            self.loss.update(pl_module.loss_fn(logits, y))
            self.acc.update(logits, y)

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append((float(self.loss.compute()), float(self.acc.compute())))
        self.loss.reset()
        self.acc.reset()


def test_five_epoch_metrics_equal_pre_change_and_torchmetrics(tmp_path, processed_dir):
    from mnistlab.train import train

    overrides = fast_overrides(tmp_path, processed_dir, epochs=5) + [
        f"+callbacks.recompute._target_={__name__}.Recompute", "logger.plots=false", "logger.log_model=false"]
    summary = train(compose(overrides))

    client, runs = store_runs(tmp_path / "mlruns")
    (run,) = runs
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)] for k in GOLDEN_HISTORY}
    for key, golden in GOLDEN_HISTORY.items():
        got = history[key]
        assert [s for s, _ in got] == [s for s, _ in golden], key
        values, expected = [v for _, v in got], [v for _, v in golden]
        if key.endswith("acc") or key.endswith("acc_best"):
            assert values == expected, key
        else:
            assert values == pytest.approx(expected, rel=1e-6), key
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {k: summary[k] for k in GOLDEN_SUMMARY} == pytest.approx(GOLDEN_SUMMARY, rel=1e-6)
    assert on_disk == pytest.approx(GOLDEN_SUMMARY, rel=1e-6)

    # the independent computation: what torchmetrics says about the same batches and weights
    # (the logger writes float32 values as their shortest decimal: clean_float, as mnistlab's MLflow logger does)
    from mnistlab.callbacks import clean_float

    side = [(clean_float(loss), clean_float(acc)) for loss, acc in Recompute.last.epochs]
    assert len(side) == 5
    assert [v for _, v in history["train/acc"]] == [a for _, a in side]
    assert [v for _, v in history["train/loss"]] == pytest.approx([loss for loss, _ in side], rel=1e-6)
    # curves.csv (EpochHistory) shows the same train values as MLflow
    rows = (tmp_path / "out" / "curves.csv").read_text().splitlines()[1:]
    assert [float(r.split(",")[2]) for r in rows] == pytest.approx([a for _, a in side], abs=5e-7)


class Probe(pl.Callback):
    """Which loop trained: Lightning's automatic one, or the manual step, direct or through Lightning's wrappers."""

    last: "Probe | None" = None

    def __init__(self):
        self.loop: tuple[bool, bool] | None = None
        self.optimizer_steps = 0
        Probe.last = self

    def on_train_epoch_start(self, trainer, pl_module):
        self.loop = (pl_module.automatic_optimization, pl_module._lightning_step)


class StepProbe(Probe):
    """A callback with a per-step optimizer hook: the manual step must go through Lightning and call it."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.optimizer_steps += 1


@pytest.mark.parametrize("probe, extra, loop", [
    ("Probe", [], (False, False)),  # the default: manual, backward and step called directly
    ("StepProbe", [], (False, True)),  # a step hook: manual_backward + LightningOptimizer.step
    ("Probe", ["trainer.gradient_clip_val=1e9"], (True, True)),  # clipping: Lightning's automatic loop
])
def test_every_training_loop_gives_the_same_metrics(tmp_path, processed_dir, probe, extra, loop):
    """The manual step (either way) and Lightning's automatic loop train the same model: the same golden curves,
    train/loss_step at the same steps, and a callback's per-step hook still runs once per step when it exists.
    (Clipping at norm 1e9 never binds and multiplies the gradients by exactly 1.)"""
    from mnistlab.train import train

    overrides = fast_overrides(tmp_path, processed_dir, epochs=5) + [
        f"+callbacks.probe._target_={__name__}.{probe}", "logger.plots=false", "logger.log_model=false", *extra]
    summary = train(compose(overrides))
    assert Probe.last.loop == loop
    client, (run,) = store_runs(tmp_path / "mlruns")
    for key, golden in GOLDEN_HISTORY.items():
        got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert [s for s, _ in got] == [s for s, _ in golden], key
        assert [v for _, v in got] == pytest.approx([v for _, v in golden], rel=1e-6), key
    assert {k: summary[k] for k in GOLDEN_SUMMARY} == pytest.approx(GOLDEN_SUMMARY, rel=1e-6)
    assert Probe.last.optimizer_steps == (80 if probe == "StepProbe" else 0)


def test_train_epoch_metrics_weighting():
    """train/loss is the UNWEIGHTED mean of the batch losses (as MeanMetric.update(loss) was), train/acc the micro
    accuracy; a smaller last batch must count as one batch for the loss and by its samples for the accuracy."""
    from mnistlab.model import MnistMLP

    model = MnistMLP(model={"input_size": 4, "hidden_sizes": [3], "num_classes": 10, "activation": "relu",
                            "dropout": 0.0}, optimizer={"name": "sgd"})
    model.on_train_epoch_start()
    ref_loss, ref_acc = MeanMetric(), MulticlassAccuracy(num_classes=10, average="micro")
    g = torch.Generator().manual_seed(0)
    for n in (8, 8, 3):
        logits, y = torch.randn(n, 10, generator=g), torch.randint(0, 10, (n,), generator=g)
        loss = torch.nn.functional.cross_entropy(logits, y)
        model._accumulate_train(logits, y, loss)
        ref_loss.update(loss)
        ref_acc.update(logits, y)
    loss, acc = model.train_epoch_metrics()
    assert loss.dtype == torch.float32 and acc.dtype == torch.float32
    assert torch.equal(loss, ref_loss.compute()) and torch.equal(acc, ref_acc.compute())
    model.on_train_epoch_start()
    assert model._train_counts == [0, 0] and float(model._train_loss_sum) == 0.0
