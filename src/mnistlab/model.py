"""The book's MLP as a LightningModule: cross-entropy on logits, torchmetrics accuracy per split, the test confusion matrix."""

from __future__ import annotations

from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def build_mlp(
    input_size: int, hidden_sizes: list[int], num_classes: int, activation: str, dropout: float, init: str = "torch"
) -> nn.Sequential:
    """init "torch" keeps nn.Linear's own initialisation; "keras" is Dense's: glorot_uniform kernel, zero bias."""
    layers: list[nn.Module] = []
    width = input_size
    for h in hidden_sizes:
        layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    if init == "keras":
        for layer in layers:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class MnistMLP(pl.LightningModule):
    """Dense(hidden, act) ... -> Dense(num_classes); the softmax lives in the loss."""

    def __init__(self, model: dict[str, Any], optimizer: dict[str, Any]):
        super().__init__()
        # Plain dicts: Lightning 2.6 loads checkpoints with weights_only=True, which rejects DictConfig.
        self.save_hyperparameters({"model": dict(model), "optimizer": dict(optimizer)}, logger=False)
        self.net = build_mlp(
            model["input_size"], list(model["hidden_sizes"]), model["num_classes"], model["activation"], model["dropout"],
            model.get("init", "torch"),  # checkpoints saved before the knob existed: torch's init
        )
        n = model["num_classes"]
        self.loss_fn = nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.test_confusion = MulticlassConfusionMatrix(num_classes=n)
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # in the checkpoint, so a resumed run keeps its best
        self.test_predictions: torch.Tensor | None = None
        self.test_confusion_matrix: torch.Tensor | None = None
        self.samples_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        self.samples_seen += y.shape[0]
        self.train_loss.update(loss.detach())
        self.train_acc.update(logits.detach(), y)
        # self.log costs more per call than this MLP's step; call it only on the steps the logger writes.
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_train_end(self) -> None:
        # Under DDP each rank counted its shard; one all-reduce while all ranks are still here gives the total.
        self.samples_seen = int(self.all_gather(torch.tensor(self.samples_seen)).sum())

    def on_train_epoch_end(self) -> None:
        self.log("train/loss", self.train_loss.compute(), sync_dist=True)  # computed over all ranks already
        self.log("train/acc", self.train_acc.compute(), sync_dist=True)
        self.train_loss.reset()
        self.train_acc.reset()

    def _eval_step(self, batch, loss_metric, acc_metric):
        x, y = batch
        logits = self(x)
        loss_metric.update(self.loss_fn(logits, y), weight=y.shape[0])
        acc_metric.update(logits, y)
        return logits, y

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_loss, self.val_acc)

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        # torchmetrics' compute() already reduces over DDP ranks; sync_dist=True tells Lightning (it warns otherwise)
        self.log("val/loss", self.val_loss.compute(), sync_dist=True)
        self.log("val/acc", acc, prog_bar=True, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(acc)
            self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)
        self.val_loss.reset()
        self.val_acc.reset()

    def on_test_epoch_start(self) -> None:
        self._test_preds: list[torch.Tensor] = []

    def test_step(self, batch, batch_idx):
        logits, y = self._eval_step(batch, self.test_loss, self.test_acc)
        self.test_confusion.update(logits, y)
        self._test_preds.append(logits.argmax(dim=1))

    def on_test_epoch_end(self) -> None:
        self.log("test/loss", self.test_loss.compute(), sync_dist=True)
        self.log("test/acc", self.test_acc.compute(), sync_dist=True)
        # computed here, on every rank: after test() only rank 0 is left to log, and compute() is a collective
        self.test_confusion_matrix = self.test_confusion.compute().cpu()
        self.test_predictions = torch.cat(self._test_preds).cpu()
        self.test_loss.reset()
        self.test_acc.reset()

    def configure_optimizers(self):
        opt_cfg = {k: v for k, v in self.hparams["optimizer"].items() if k != "name"}
        make_optimizer = hydra.utils.instantiate(opt_cfg)
        return make_optimizer(params=self.parameters())
