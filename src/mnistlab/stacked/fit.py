"""Which trials can share a stack, and one Lightning fit of a stack that leaves each member's results in a file."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from mnistlab.callbacks import non_finite_message
from mnistlab.config import MLP_TARGET
from mnistlab.metrics import OBJECTIVE
from mnistlab.paths import resolve
from mnistlab.requeue import lightning_plugins
from mnistlab.stacked.nets import StackedBatches, StackedMLP, StackedOptimizer, member_losses, optimizer_rule
from mnistlab.threads import configure_threads

log = logging.getLogger("mnistlab.stacked")
# callbacks a stack honours itself: the checkpoint choice (best val/acc, per member), the non-finite guard (per
# member), the progress bar (off in a sweep). Anything else (early stopping) would need per-member control of the loop.
HONOURED_CALLBACKS = ("model_checkpoint", "finite_loss", "rich_progress_bar")


def _plain(node) -> object:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


# what a job's config must hold to be an mnistlab trial the stack can train (any other app's jobs run one by one)
TRIAL_KEYS = ("seed", "model", "optimizer", "data", "trainer", "callbacks", "logger", "paths")


def stack_problem(cfg: DictConfig) -> str | None:
    """Why the trial of `cfg` cannot be trained in a stack (None: it can)."""
    missing = [k for k in TRIAL_KEYS if k not in cfg]
    if missing:
        return f"not an mnistlab trial (its config has no {', '.join(missing)})"
    rule, why = optimizer_rule(_plain(cfg.optimizer))
    if rule is None:
        return why
    trainer = _plain(cfg.trainer)
    if cfg.model.get("_target_") != MLP_TARGET:
        return f"model {cfg.model.get('_target_')} has no stacked form (only the MLP stacks)"
    checks = [
        (cfg.model.dropout == 0, "dropout needs each member's own random masks"),
        (cfg.data.validation, "data.validation=false is not stacked"),
        (not cfg.get("compile"), "compile is not stacked"),
        (not cfg.get("ckpt_path"), "resuming a checkpoint is not stacked"),
        (trainer.get("gradient_clip_val") in (None, 0), "gradient clipping is not stacked"),
        (trainer.get("accumulate_grad_batches", 1) == 1, "accumulate_grad_batches is not stacked"),
        (str(trainer.get("precision")) in ("32-true", "32"), "only precision 32-true is stacked"),
        (trainer.get("devices") in (1, "1", None) and trainer.get("num_nodes", 1) == 1
         and trainer.get("strategy", "auto") == "auto", "one device only"),
    ]
    for name, cb in _plain(cfg.callbacks or {}).items():
        if cb is not None and name not in HONOURED_CALLBACKS:
            checks.append((False, f"callbacks.{name} is not stacked"))
    ckpt = (cfg.callbacks or {}).get("model_checkpoint")
    if ckpt is not None:
        checks.append((ckpt.get("monitor") == "val/acc" and ckpt.get("mode") == "max" and ckpt.get("save_top_k") == 1
                       and "{" not in str(ckpt.get("filename")), "only the default model_checkpoint is stacked"))
    return next((why for ok, why in checks if not ok), None)


def group_key(cfg: DictConfig) -> str:
    """Trials with equal keys share data, shapes, epochs and trainer settings: one stack can train them."""
    keep = ("model", "data", "trainer", "callbacks", "test_ckpt", "flush_denormal", "num_threads")
    return json.dumps({k: _plain(cfg.get(k)) for k in keep}, sort_keys=True, default=str)


class StackedModule(pl.LightningModule):
    """The members as one LightningModule (manual optimization: one backward of the summed member losses, one
    StackedOptimizer step). Per member, as the ordinary MnistMLP and its callbacks compute them: train/loss (unweighted
    mean of the batch losses), train/acc, val/loss (sample-weighted), val/acc, val/acc_best, the best-val/acc weights
    (ModelCheckpoint's strict improvement), a FiniteLossGuard check every `check_every` batches and at epoch end."""

    def __init__(self, nets, rules: list[str], opts: list[dict], log_every: int, check_every: int | None):
        super().__init__()
        self.automatic_optimization = False
        self.stack = StackedMLP(nets)
        self.rules, self.opts, self.log_every, self.check_every = rules, opts, log_every, check_every
        m = self.stack.members
        self.errors: list[str | None] = [None] * m
        self.rows: list[list[dict]] = [[] for _ in range(m)]
        self.step_losses: list[tuple[int, int, torch.Tensor]] = []  # (epoch, global step, losses [M])
        self.best_acc = [-math.inf] * m
        self.best: list[dict | None] = [None] * m
        self.samples_seen = 0
        for name, dtype in (("_loss_sum", torch.float32), ("_correct", torch.int64), ("_val_loss_sum", torch.float32),
                            ("_val_correct", torch.int64)):
            self.register_buffer(name, torch.zeros(m, dtype=dtype), persistent=False)
        self._counts = [0, 0, 0]  # train batches, train samples, val samples

    def configure_optimizers(self):
        return StackedOptimizer(self.stack.parameters(), self.rules, self.opts)

    def on_train_epoch_start(self) -> None:
        self._loss_sum.zero_()
        self._correct.zero_()
        self._counts[:2] = [0, 0]

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        logits = self.stack(x)
        losses = member_losses(logits, y)
        self.manual_backward(losses.sum())  # the sum: each member's gradient is its own mean loss's
        opt.step()
        losses = losses.detach()
        self._loss_sum.add_(losses)
        self._correct.add_((logits.detach().argmax(dim=2) == y).sum(1))
        self._counts[0] += 1
        self._counts[1] += y.shape[1]
        self.samples_seen += y.shape[1]
        step = self.trainer.global_step - 1  # the step MnistMLP logs train/loss_step at
        if (step + 1) % self.log_every == 0:
            self.step_losses.append((self.current_epoch, step, losses.clone()))
        if self.check_every and batch_idx % self.check_every == 0:
            self._check(losses)

    def _check(self, losses: torch.Tensor) -> None:
        """FiniteLossGuard per member (one host sync, as the guard's): a member gone non-finite is FAILED, frozen."""
        bad = ~torch.isfinite(losses)
        if not bool(bad.any()):
            return
        for m in bad.nonzero().flatten().tolist():
            if self.errors[m] is None:
                self.errors[m] = non_finite_message(float(losses[m]), self.current_epoch, self.global_step, self.opts[m])
                self.optimizers().optimizer.freeze(m)

    def on_validation_epoch_start(self) -> None:
        self._val_loss_sum.zero_()
        self._val_correct.zero_()
        self._counts[2] = 0

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.stack(x)
        ys = y.expand(logits.shape[0], -1)
        self._val_loss_sum.add_(member_losses(logits, ys) * y.shape[0])  # MeanMetric.update(loss, weight=B)
        self._val_correct.add_((logits.argmax(dim=2) == ys).sum(1))
        self._counts[2] += y.shape[0]

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        n = self._counts[2]
        self._val = {"val/loss": (self._val_loss_sum / float(n)).tolist(),
                     "val/acc": (self._val_correct.float() / float(n)).tolist()}
        for m, acc in enumerate(self._val["val/acc"]):
            if self.errors[m] is None and acc > self.best_acc[m]:  # ModelCheckpoint(mode=max): strictly better
                self.best_acc[m] = acc
                self.best[m] = self.stack.member_state(m)

    def on_train_epoch_end(self) -> None:
        loss = (self._loss_sum / float(self._counts[0])).tolist()
        acc = (self._correct.float() / float(self._counts[1])).tolist()
        val, self._val = getattr(self, "_val", None), None
        for m in range(self.stack.members):
            if self.errors[m] is not None:
                continue
            if self.check_every and not math.isfinite(loss[m]):
                self._check(torch.tensor(loss))
                continue
            row = {"epoch": self.current_epoch + 1, "train/loss": loss[m], "train/acc": acc[m]}
            if val is not None:
                row.update({k: v[m] for k, v in val.items()}, **{OBJECTIVE: self.best_acc[m]})
            self.rows[m].append(row)

    def member_result(self, m: int) -> dict:
        """What member m's trial adopts (stacked.adopt): curves, per-step losses, error, best and last weights."""
        return {
            "rows": self.rows[m], "error": self.errors[m], "best": self.best[m], "last": self.stack.member_state(m),
            "step_losses": [(e, s, float(v[m])) for e, s, v in self.step_losses],
            "samples_seen": self.samples_seen, "global_step": self.trainer.global_step,
            "current_epoch": self.trainer.current_epoch,
        }


def member_nets(cfgs: list[DictConfig]) -> list:
    """Each member's initial net, made as train() makes it: seed_everything(seed), then MnistMLP (nothing between
    them draws from torch's generator: the data module only reads files)."""
    from mnistlab.model import MnistMLP

    nets = []
    for cfg in cfgs:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        nets.append(MnistMLP(model=_plain(cfg.model), optimizer=_plain(cfg.optimizer)).net)
    return nets


def train_group(cfgs: list[DictConfig], result_files: list[Path], root: Path, parallel: int = 1) -> float:
    """Train the trials of `cfgs` (one group_key, all stackable) in one Lightning fit, with cores / `parallel` torch
    threads (the stacks running at once); member i's results go to result_files[i] (torch.save). Returns the fit's
    seconds."""
    import hydra

    from mnistlab.data.datamodule import DeviceBatches, MnistDataModule
    from mnistlab.logging_setup import quiet_lightning

    quiet_lightning()
    order = sorted(range(len(cfgs)), key=lambda i: optimizer_rule(_plain(cfgs[i].optimizer))[0])  # rules contiguous
    cfgs, result_files = [cfgs[i] for i in order], [result_files[i] for i in order]
    c0 = cfgs[0]
    configure_threads(c0.num_threads, parallel, bool(c0.flush_denormal))
    opts = [_plain(c.optimizer) for c in cfgs]
    nets = member_nets(cfgs)
    guard = (c0.callbacks or {}).get("finite_loss")
    module = StackedModule(nets, [optimizer_rule(o)[0] for o in opts], opts, int(c0.trainer.log_every_n_steps),
                           int(guard.check_every_n_steps) if guard else None)
    dm = MnistDataModule(resolve(c0.data.processed_dir, root), c0.data.batch_size, c0.data.eval_batch_size, c0.seed)
    dm.setup()
    trainer = hydra.utils.instantiate(
        c0.trainer, callbacks=[], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, plugins=lightning_plugins(),
        default_root_dir=str(result_files[0].parent.parent / ".stacked"),
    )
    device = trainer.strategy.root_device
    (xt, yt), (xv, yv) = [tuple(t.to(device) for t in dm.split(s)) for s in ("train", "val")]
    train = StackedBatches(xt, yt, c0.data.batch_size, [int(c.seed) for c in cfgs], lambda: trainer.current_epoch)
    val = DeviceBatches(xv, yv, c0.data.eval_batch_size, shuffle=False)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    seconds = time.perf_counter() - start
    if trainer.interrupted:
        raise KeyboardInterrupt("stacked training was interrupted")
    for m, path in enumerate(result_files):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**module.member_result(m), "fit_seconds": seconds / len(cfgs)}, path)
    return seconds
