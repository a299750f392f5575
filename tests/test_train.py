"""Training on fixture data: outputs, determinism, resume after an interruption, the device-resident batches."""

from __future__ import annotations

import json
import os
import signal

import lightning.pytorch as pl
import pytest
import torch

from conftest import checkpoint_test_acc, compose, fast_overrides, read_csv, run_train, store_runs
from mnistlab.data.datamodule import DeviceBatches
from mnistlab.train import train


class SigintAtEpoch(pl.Callback):
    """Sends this process a real signal (SIGINT: what Ctrl-C does) at the start of the given epoch."""

    def __init__(self, epoch: int, signum: int = int(signal.SIGINT)):
        self.epoch, self.signum = epoch, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            os.kill(os.getpid(), self.signum)


def test_fast_run_writes_metrics_and_one_curve_row_per_epoch(tmp_path, processed_dir):
    metrics = train(compose(fast_overrides(tmp_path, processed_dir, epochs=2) + ["logger=none"]))
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    timing = json.loads((tmp_path / "out" / "timing.json").read_text())
    assert {**saved, **timing} == metrics
    # results only (DVC tracks this file); samples_seen: 2 epochs x 500 images (the fixture's 600 minus 100 val)
    assert set(saved) == {"test/acc", "test/loss", "val/acc_best", "epochs", "samples_seen"}
    assert saved["samples_seen"] == 2 * 500
    assert set(timing) == {"fit_seconds", "samples_per_second"} and timing["fit_seconds"] > 0
    assert saved["epochs"] == 2  # and test/acc is the best checkpoint's (test_ckpt=best), recomputed here
    assert saved["test/acc"] == pytest.approx(
        checkpoint_test_acc(tmp_path / "out" / "checkpoints" / "best.ckpt", processed_dir), abs=1e-6)
    rows = read_csv(tmp_path / "out" / "curves.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert list(rows[0]) == ["epoch", "train/loss", "train/acc", "val/loss", "val/acc"]
    assert float(rows[1]["train/loss"]) < float(rows[0]["train/loss"])
    assert saved["val/acc_best"] == pytest.approx(max(float(r["val/acc"]) for r in rows), abs=1e-6)
    assert (tmp_path / "out" / "checkpoints" / "best.ckpt").is_file()


def test_same_config_and_seed_give_identical_metrics(tmp_path, processed_dir):
    a = train(compose(fast_overrides(tmp_path / "a", processed_dir) + ["logger=none"]))
    b = train(compose(fast_overrides(tmp_path / "b", processed_dir) + ["logger=none"]))
    c = train(compose(fast_overrides(tmp_path / "c", processed_dir) + ["logger=none", "seed=7"]))
    assert a["test/acc"] == b["test/acc"] and a["test/loss"] == b["test/loss"]
    assert read_csv(tmp_path / "a/out/curves.csv") == read_csv(tmp_path / "b/out/curves.csv")
    assert c["test/loss"] != a["test/loss"], "the seed must matter"


def test_resume_after_interrupt_continues_from_the_saved_epoch(tmp_path, processed_dir):
    common = fast_overrides(tmp_path / "r", processed_dir, epochs=3) + ["logger=none", "test_ckpt=last"]
    straight = train(compose(fast_overrides(tmp_path / "s", processed_dir, epochs=3) + ["logger=none", "test_ckpt=last"]))

    interrupted = compose(common + ["+callbacks.interrupt._target_=test_train.SigintAtEpoch", "+callbacks.interrupt.epoch=1"])
    with pytest.raises(SystemExit):
        train(interrupted)
    last = tmp_path / "r" / "out" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert torch.load(last, weights_only=True)["epoch"] == 0  # only the first epoch completed
    assert not (tmp_path / "r" / "out" / "metrics.json").exists(), "an interrupted run must not write metrics"

    resumed = train(compose(common + [f"ckpt_path={last}"]))
    assert [int(r["epoch"]) for r in read_csv(tmp_path / "r/out/curves.csv")] == [1, 2, 3]
    assert resumed["test/acc"] == straight["test/acc"]
    assert resumed["test/loss"] == pytest.approx(straight["test/loss"], rel=1e-6)


def test_last_ckpt_is_the_last_epoch_even_when_it_is_not_the_best(tmp_path, processed_dir):
    """Lightning >= 2.6 writes last.ckpt only when the best improves: at batch 4 this data's val/acc peaks in epoch 1,
    so last.ckpt stayed epoch 1's, a resume (a SLURM requeue) trained epochs 2-4 again and test_ckpt=last tested the
    best weights. last.ckpt now holds the final weights."""
    metrics = train(compose(fast_overrides(tmp_path, processed_dir, epochs=4) + [
        "logger=none", "data.batch_size=4", "test_ckpt=last"]))
    ckpts = tmp_path / "out" / "checkpoints"
    last, best = (torch.load(ckpts / f"{n}.ckpt", weights_only=True) for n in ("last", "best"))
    assert last["epoch"] == 3 and best["epoch"] < 3, (last["epoch"], best["epoch"])  # the case this test is for
    assert metrics["test/acc"] == pytest.approx(checkpoint_test_acc(ckpts / "last.ckpt", processed_dir), abs=1e-6)


@pytest.mark.parametrize("first, then", [("trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val=null"),
                                         ("trainer.gradient_clip_val=null", "trainer.gradient_clip_val=1.0")],
                         ids=["automatic-then-manual", "manual-then-automatic"])
def test_a_resume_across_optimization_modes_keeps_counting_steps(tmp_path, processed_dir, first, then):
    """Gradient clipping runs Lightning's automatic loop, everything else the manual step; they count global_step in
    different progress trackers. A run resumed in the other mode goes on from the checkpoint's step (MLflow's step
    axis), not from 0; switched back, it goes on from the latest count, not from the one its own mode saved before."""
    last = tmp_path / "out" / "checkpoints" / "last.ckpt"
    train(compose(fast_overrides(tmp_path, processed_dir, epochs=1) + ["logger=none", first]))
    one_epoch = torch.load(last, weights_only=True)["global_step"]
    assert one_epoch > 0
    for epochs, mode in ((2, then), (3, first)):
        train(compose(fast_overrides(tmp_path, processed_dir, epochs=epochs) + ["logger=none", mode, f"ckpt_path={last}"]))
        assert torch.load(last, weights_only=True)["global_step"] == epochs * one_epoch


def test_cli_resume_takes_the_runs_own_overrides_and_the_command_lines_win(tmp_path, processed_dir):
    """README's `python -m mnistlab.train ckpt_path=<last.ckpt>` on a momentum run: it resumes as momentum (the
    default rmsprop would fail on momentum's optimizer state), with trainer.max_epochs from the command line."""
    common = [o for o in fast_overrides(tmp_path, processed_dir) if not o.startswith("paths.output_dir=")]
    first = run_train(tmp_path, *common, "optimizer=momentum", "optimizer.lr=0.03", f"hydra.run.dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    resumed = run_train(tmp_path, *common, f"ckpt_path={last}", "trainer.max_epochs=3", f"hydra.run.dir={tmp_path / 'b'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "with the overrides it was started with" in resumed.stderr and "optimizer=momentum" in resumed.stderr
    _, runs = store_runs(tmp_path / "mlruns")
    latest = max(runs, key=lambda r: r.info.start_time)
    assert (latest.data.params["optimizer"], latest.data.params["lr"], latest.data.params["max_epochs"]) == ("momentum", "0.03", "3")
    before, after = read_csv(tmp_path / "a" / "curves.csv"), read_csv(tmp_path / "b" / "curves.csv")
    assert [int(r["epoch"]) for r in after] == [1, 2, 3] and after[:2] == before, "epochs 1-2 from the checkpoint"


def test_device_batches_cover_each_sample_once_in_a_seeded_order():
    x = torch.arange(103, dtype=torch.float32).unsqueeze(1)
    y = torch.arange(103)
    epoch = {"n": 0}
    batches = DeviceBatches(x, y, batch_size=10, shuffle=True, seed=3, epoch_fn=lambda: epoch["n"])
    first = torch.cat([b[1] for b in batches])
    assert len(batches) == 11 and sorted(first.tolist()) == list(range(103))
    assert torch.equal(first, torch.cat([b[1] for b in batches])), "same epoch, same order"
    epoch["n"] = 1
    assert not torch.equal(first, torch.cat([b[1] for b in batches])), "a new epoch reshuffles"
    shards = [torch.cat([b[1] for b in DeviceBatches(x, y, 10, True, 3, lambda: 1, rank=r, world_size=2)]) for r in (0, 1)]
    assert sorted(torch.cat(shards).tolist()) == list(range(103)) and not set(shards[0].tolist()) & set(shards[1].tolist())



@pytest.mark.parametrize("flush", [True, False])
def test_every_torch_thread_of_a_run_flushes_denormals_as_configured(tmp_path, processed_dir, flush):
    """A 2-thread train() (a fresh process, as the CLI) leaves both of torch's threads with its flush_denormal: a
    multiply of 2^22 denormals, which torch splits between the threads, comes out all zero (flush) or all denormal.
    The OpenMP threads copy the main thread's FTZ/DAZ when the first parallel op starts them: had any parallel op
    run before the flush (the epoch benchmark's floor did), half would stay non-zero."""
    import subprocess
    import sys

    overrides = fast_overrides(tmp_path, processed_dir, epochs=1) + ["num_threads=2", f"flush_denormal={flush}",
                                                                    "logger=none"]
    code = ("import sys, torch; sys.path.insert(0, 'tests'); from conftest import compose; "
            f"from mnistlab.train import train; train(compose({overrides!r})); "
            # 2^22 copies of the smallest denormal, made from its bit pattern (a float constant would be flushed)
            "x = torch.ones((1 << 22,), dtype=torch.int32).view(torch.float32); print(int(((x * 1.0) != 0).sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.strip().splitlines()[-1]) == (0 if flush else 1 << 22)


def test_fast_dev_run_is_a_smoke_test_that_records_no_result(tmp_path, processed_dir):
    """Lightning drops the logger under fast_dev_run; the run used to record val/acc_best, plots and a one-batch
    test/acc in metrics.json as if it were a result (issue 24)."""
    proc = run_train(tmp_path, *fast_overrides(tmp_path, processed_dir), "+trainer.fast_dev_run=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fast_dev_run: the loops ran on 1 batch(es)" in proc.stderr + proc.stdout
    assert not (tmp_path / "out" / "metrics.json").exists() and not (tmp_path / "out" / "curves.csv").exists()
    assert store_runs(tmp_path / "mlruns")[1] == []


class FirstBatchLabels(pl.Callback):
    """Keeps the labels of each epoch's first training batch."""

    seen: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            FirstBatchLabels.seen.append(batch[1].tolist())


def test_overfit_batches_trains_on_the_same_batches_every_epoch(tmp_path, processed_dir):
    """+trainer.overfit_batches=2 still shuffled (DeviceBatches has no sampler for Lightning to replace), so it was
    limit_train_batches under another name (issue 24)."""
    FirstBatchLabels.seen = []
    train(compose(fast_overrides(tmp_path, processed_dir, epochs=3) + [
        "logger=none", "+trainer.overfit_batches=2", f"+callbacks.probe._target_={__name__}.FirstBatchLabels"]))
    first, *rest = FirstBatchLabels.seen
    assert len(rest) == 2 and all(r == first for r in rest)


def test_chdir_into_a_run_dir_outside_the_project_keeps_the_projects_store(project_copy, tmp_path, processed_dir):
    """hydra.job.chdir=true with the run dir outside the project: the root was taken from the job's cwd, so the run
    made its own mlruns/ there (and relative data paths failed). The root is where the command was started."""
    outside = tmp_path / "elsewhere" / "run"
    args = [f"data.processed_dir={processed_dir}", "data.val_size=100", "data.batch_size=32",
            "data.eval_batch_size=100", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
            "callbacks.rich_progress_bar=null", "logger.plots=false", "logger.log_model=false", "num_threads=1",
            "hydra.job.chdir=true", f"hydra.run.dir={outside}"]
    proc = run_train(project_copy, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, (run,) = store_runs(project_copy / "mlruns")
    assert run.info.status == "FINISHED"
    assert not list((tmp_path / "elsewhere").rglob("mlflow.db")), "no store of its own in the run dir"


def test_a_fit_stopped_by_max_time_writes_no_stale_step_points(tmp_path, processed_dir):
    """+trainer.max_time: once the fit should stop, Lightning flushes its cached step metrics on every step, and
    train/loss_step re-logged the last value at steps that logged nothing (issue 24). Only the logging steps hold
    points now, each a fresh loss."""
    # batch 1: 500 steps an epoch, so the time runs out inside one
    proc = run_train(tmp_path, *fast_overrides(tmp_path, processed_dir, epochs=10_000), "data.batch_size=1",
                     "+trainer.max_time=00:00:00:02")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("Time limit reached") <= 1
    client, (run,) = store_runs(tmp_path / "mlruns")
    points = client.get_metric_history(run.info.run_id, "train/loss_step")
    steps = [p.step for p in points]
    assert len(points) > 10 and steps == sorted(set(steps))
    assert all((s + 1) % 4 == 0 for s in steps), [s for s in steps if (s + 1) % 4]  # log_every_n_steps=4
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["epochs"] < 10_000
