"""The classifier as a LightningModule around the configured net (mnistlab.nets, by `_target_`): cross-entropy on
logits, accuracy and mean loss per split, the test confusion matrix.

Training accumulates its epoch metrics as on-device sums (no torchmetrics call per step: a Metric.update costs
more than this MLP's step on a CPU, and per-step framework work dominates on a GPU); validation and test, a few
large batches per epoch, keep torchmetrics.

Each training step runs under Lightning's manual optimization (zero_grad, backward, step in training_step):
Lightning's automatic loop (a closure and about ten hook dispatches per step) cost more than this MLP's step on a
CPU. On one device at full precision, when no callback implements the backward/optimizer-step hooks, the backward
and the step are called directly (needs_lightning_step); gradient clipping or accumulation keeps Lightning's
automatic loop (use_automatic_optimization)."""

from __future__ import annotations

import copy
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from mnistlab.compat import count_manual_step, freeze_signature
from mnistlab.config import MLP_TARGET
from mnistlab.metrics import OBJECTIVE, STEP_LOSS

# The per-step hooks Lightning's own backward and optimizer step dispatch (to every callback, overridden or not).
_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def use_automatic_optimization(trainer_cfg) -> bool:
    """Lightning's automatic loop only where it does something the manual step does not: gradient clipping and
    gradient accumulation (Lightning refuses both under manual optimization)."""
    return bool(trainer_cfg.get("gradient_clip_val")) or int(trainer_cfg.get("accumulate_grad_batches") or 1) != 1


def needs_lightning_step(trainer) -> bool:
    """Whether backward and step must go through Lightning (manual_backward, LightningOptimizer.step): under DDP or
    another strategy, with a precision plugin that scales or casts, or when a callback implements a backward/step
    hook. Otherwise they are a plain loss.backward() and optimizer.step(), which is all Lightning's would do here.
    Measured (benchmarks/epoch_speed.py --epochs 5, batch 128, the two alternated 3 times): the epoch over the floor,
    median 1.30-1.33 direct vs 1.36-1.40 through Lightning (automatic loop before: 1.405)."""
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import SingleDeviceStrategy
    from lightning.pytorch.utilities.model_helpers import is_overridden

    return (
        type(trainer.strategy) is not SingleDeviceStrategy
        or type(trainer.precision_plugin) is not Precision
        or any(is_overridden(h, cb, pl.Callback) for cb in trainer.callbacks for h in _STEP_HOOKS)
        or any(is_overridden(h, trainer.lightning_module, pl.LightningModule) for h in _STEP_HOOKS)
    )


def build_net(model: dict[str, Any]) -> nn.Module:
    """The net of a model config: its `_target_` (conf/model/*.yaml) with the other keys as arguments. A checkpoint
    saved before models had a `_target_` holds the MLP's keys (and, older still, no init: torch's)."""
    if "_target_" not in model:
        model = {"_target_": MLP_TARGET, "init": "torch", **model}
    return hydra.utils.instantiate(model, _convert_="all")


def plain_net(model: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A float32 eval-mode net of `model` holding a MnistMLP's weights (`net.*` of its state_dict): what the
    registry serves, also from a compiled net or a checkpoint."""
    net = build_net(model)
    net.load_state_dict({k[len("net."):]: v for k, v in state_dict.items() if k.startswith("net.")})
    return net.float().eval()


class MnistMLP(pl.LightningModule):
    """Any net of conf/model/ (the book's MLP by default) trained as a classifier; the softmax lives in the loss."""

    def __init__(self, model: dict[str, Any], optimizer: dict[str, Any]):
        super().__init__()
        # Plain dicts: Lightning 2.6 loads checkpoints with weights_only=True, which rejects DictConfig.
        self.save_hyperparameters({"model": dict(model), "optimizer": dict(optimizer)}, logger=False)
        self.net = build_net(model)
        n = model["num_classes"]
        self.loss_fn = nn.CrossEntropyLoss()
        self.val_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.test_confusion = MulticlassConfusionMatrix(num_classes=n)
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # in the checkpoint, so a resumed run keeps its best
        self.test_predictions: torch.Tensor | None = None
        self.test_confusion_matrix: torch.Tensor | None = None
        self.samples_seen = 0
        # The training epoch's sums on the device, as the torchmetrics states they replace: a float32 running sum of
        # the batch losses (MeanMetric's mean_value) and the int64 count of correct predictions (MulticlassAccuracy's
        # tp); batches and samples are Python ints in a list (no nn.Module.__setattr__ per step). Buffers (not persistent, like metric states: never in a
        # checkpoint) so that .to(device) moves them.
        self.register_buffer("_train_loss_sum", torch.zeros((), dtype=torch.float32), persistent=False)
        self.register_buffer("_train_correct", torch.zeros((), dtype=torch.int64), persistent=False)
        self._train_counts = [0, 0]  # batches, samples
        self._train_epoch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.automatic_optimization = False  # train() turns it on for clipping/accumulation
        self._lightning_step = True  # decided at fit start (needs_lightning_step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        step = self.global_step  # before the manual step counts this one
        logits = self(x)
        loss = self.loss_fn(logits, y)
        if not self.automatic_optimization:
            self._optimize(loss)
        self.samples_seen += y.shape[0]
        self._accumulate_train(logits.detach(), y, loss.detach())
        # self.log costs more per call than this MLP's step; call it only on the steps the logger writes.
        if (step + 1) % self.trainer.log_every_n_steps == 0:
            self.log(STEP_LOSS, loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_train_start(self) -> None:
        self._lightning_step = self.automatic_optimization or needs_lightning_step(self.trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming across optimization modes (a run resumed with or without gradient clipping, or a checkpoint from
        before the manual step): Lightning counts global_step in the automatic loop's progress OR the manual loop's,
        and would restart it at 0 (or, after two switches, at an older count) from the other one's. The larger saved
        count goes to the loop this run uses, so global_step, log_every_n_steps and MLflow's step axis go on."""
        fit = checkpoint.get("loops", {}).get("fit_loop", {})
        auto = fit.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {}).get("step")
        manual = fit.get("epoch_loop.manual_optimization.optim_step_progress")
        if auto is None or manual is None:
            return
        used, other = (auto, manual) if self.automatic_optimization else (manual, auto)
        if other["total"]["completed"] > used["total"]["completed"]:
            used.update(copy.deepcopy(other))

    def _optimize(self, loss: torch.Tensor) -> None:
        """One manual step. The direct path still counts the step where Lightning does (compat.count_manual_step):
        global_step, log_every_n_steps, checkpoints and the MLflow step axis depend on it."""
        opt = self.optimizers()
        opt.zero_grad()
        if self._lightning_step:
            self.manual_backward(loss)
            opt.step()
            return
        loss.backward()
        count_manual_step(opt, opt.optimizer.step)

    def _accumulate_train(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        """Two in-place adds on the device per step, no host sync: the loss and the correct predictions (argmax, as
        MulticlassAccuracy's micro average counts them)."""
        self._train_loss_sum.add_(loss.to(torch.float32))
        self._train_correct.add_((logits.argmax(dim=1) == y).sum())
        counts = self._train_counts
        counts[0] += 1
        counts[1] += y.shape[0]

    def train_epoch_metrics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train/loss, train/acc) of the epoch so far, summed over DDP ranks (a collective: call it on every rank).

        The same values as the torchmetrics objects this replaces, bit for bit: train/loss is the UNWEIGHTED mean of
        the batch losses (MeanMetric.update(loss) has weight 1: the last, smaller batch counts as one batch), a
        float32 sum divided by the float32 batch count; train/acc = correct / samples in float32 (micro accuracy).
        Computed once per epoch and kept until the next one starts (EpochHistory and on_train_epoch_end share it).
        """
        if self._train_epoch is None:
            dev = self._train_loss_sum.device
            batches, samples = self._train_counts
            floats = torch.stack([self._train_loss_sum, torch.tensor(float(batches), device=dev)])
            ints = torch.stack([self._train_correct, torch.tensor(samples, device=dev)])
            if self._trainer is not None:  # DDP: an all-reduce; one device: returned as is
                floats = self.trainer.strategy.reduce(floats, reduce_op="sum")
                ints = self.trainer.strategy.reduce(ints, reduce_op="sum")
            self._train_epoch = (floats[0] / floats[1], ints[0].float() / ints[1].float())
        return self._train_epoch

    def _reset_train_sums(self) -> None:
        self._train_loss_sum.zero_()
        self._train_correct.zero_()
        self._train_counts = [0, 0]
        self._train_epoch = None

    def on_train_epoch_start(self) -> None:
        self._reset_train_sums()

    def on_train_end(self) -> None:
        # Under DDP each rank counted its shard; one all-reduce while all ranks are still here gives the total.
        self.samples_seen = int(self.all_gather(torch.tensor(self.samples_seen)).sum())

    def on_train_epoch_end(self) -> None:
        loss, acc = self.train_epoch_metrics()
        self.log("train/loss", loss, sync_dist=True)  # summed over all ranks already
        self.log("train/acc", acc, sync_dist=True)
        self._reset_train_sums()

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
            self.log(OBJECTIVE, self.val_acc_best.compute(), sync_dist=True)
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


freeze_signature(MnistMLP.training_step)
