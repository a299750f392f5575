"""The study done right: chosen on validation, seeds with intervals that match the runs, resume that trains only
what is missing, and the DVC study stage reachable with `dvc exp run -S`."""

from __future__ import annotations

import json
import math
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from scipy import stats

from conftest import PROJECT_ROOT, cli_env, read_csv
from mnistlab.tracking.store import default_tracking_uri, ensure_experiment
from mnistlab.tracking.tags import PARENT_TAG, REUSED_TAG, SWEEP_TAG


def test_chosen_config_is_the_validation_winner_even_when_test_disagrees(tmp_path):
    """A real MLflow store where config A wins on validation and B on test: A is chosen everywhere."""
    from mnistlab.report import write_sweep_report

    uri = default_tracking_uri(tmp_path / "mlruns")
    client = MlflowClient(uri)
    exp = ensure_experiment(uri, "mnistlab", tmp_path / "mlruns")
    parent = client.create_run(exp, run_name="sweep", tags={SWEEP_TAG: "true"}).info.run_id
    #            optimizer lr  -> per seed (val/acc_best, test/acc)
    trials = {("sgd", 0.1): [(0.95, 0.90), (0.96, 0.91)],  # validation winner, test loser
              ("sgd", 1.0): [(0.93, 0.97), (0.94, 0.98)],  # test winner
              ("rmsprop", 0.001): [(0.97, 0.92), (0.96, 0.93)]}
    for (opt, lr), seeds in trials.items():
        for seed, (val, test) in enumerate(seeds):
            rid = client.create_run(exp, tags={PARENT_TAG: parent}).info.run_id
            for k, v in {"optimizer": opt, "lr": lr, "batch_size": 128, "seed": seed}.items():
                client.log_param(rid, k, v)
            for k, v in {"val/acc_best": val, "test/acc": test, "epochs": 5}.items():
                client.log_metric(rid, k, v)
            client.set_terminated(rid, "FINISHED")
    summary = write_sweep_report(client, parent, [tmp_path / "out"])
    study = json.loads((tmp_path / "out" / "study.json").read_text())
    assert study["chosen_on_val"]["sgd"]["lr"] == 0.1, "chosen on validation, not on test"
    assert study["chosen_on_val"]["sgd"]["test_acc_mean"] == pytest.approx(0.905)
    assert summary["best"]["config"] == "rmsprop lr=0.001 bs=128"
    tags = client.get_run(parent).data.tags
    assert tags["mnistlab.best_config"].startswith("rmsprop lr=0.001 bs=128 (selected on mean val/acc_best")
    findings = (tmp_path / "out" / "study.md").read_text()
    assert "| sgd | 0.1 | 128 | no: at the bottom of the lrs tried | 95.50 ± 6.35 (2) | 2 | 90.50 ± 6.35 |" in findings, findings
    assert "chosen on validation" in findings and "reported from the same seeds (no confirmation stage ran)" in findings
    # the paired difference rmsprop - sgd over seeds 0, 1: (0.92-0.90, 0.93-0.91) = +2 pp both
    assert "| rmsprop − sgd | 2 | +2.00 |" in findings


def _sweep_cmd(tmp: Path, processed: Path, seeds: int, extra: list[str] = ()) -> list[str]:
    return [
        sys.executable, "-m", "mnistlab.train", "sweep=optimizers", "study.optimizers=[sgd,momentum]",
        "study.lrs=[0.03,0.3]", "study.batch_sizes=[32]", f"study.seeds={seeds}", "study.max_epochs=2",
        f"data.processed_dir={processed}", "data.val_size=100", "data.eval_batch_size=100",
        "trainer.log_every_n_steps=4", f"paths.root={tmp}", f"paths.mlruns_dir={tmp / 'mlruns'}",
        "logger.log_model=false", "logger.plots=false", "num_threads=1", *extra,
    ]


def _children(client: MlflowClient, parent_id: str) -> list:
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=500)


def _sweeps(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("mnistlab")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = 'true'",
                              order_by=["attributes.start_time ASC"], max_results=50)


@pytest.mark.slow
def test_killed_sweep_rerun_trains_only_missing_trials_and_a_new_seed_only_its_trials(tmp_path, processed_dir):
    env = cli_env()
    # 1. an 8-trial sweep (2 optimizers x 2 lrs x 2 seeds), SIGKILLed once 3 trials have finished
    proc = subprocess.Popen(_sweep_cmd(tmp_path, processed_dir, 2, [f"hydra.sweep.dir={tmp_path / 's1'}"]),
                            cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, finished_before, client = time.time() + 300, [], None
    while time.time() < deadline and proc.poll() is None:
        if client is None and (tmp_path / "mlruns" / "artifacts").exists():  # the sweep created the store
            client = MlflowClient(default_tracking_uri(tmp_path / "mlruns"))
        sweeps = _sweeps(client) if client is not None else []
        if sweeps:
            finished_before = [c for c in _children(client, sweeps[0].info.run_id) if c.info.status == "FINISHED"]
            if len(finished_before) >= 3:
                break
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # the trials die with the sweep (SIGTERM: KILLED); one that was closing its run has finished
    first = _sweeps(client)[0].info.run_id
    done_first = {c.data.tags["mnistlab.config_hash"] for c in _children(client, first) if c.info.status == "FINISHED"}
    assert 3 <= len(done_first) < 8

    # 2. the same command again: only the missing trials train; the finished ones are reused
    again = subprocess.run(_sweep_cmd(tmp_path, processed_dir, 2, [f"hydra.sweep.dir={tmp_path / 's2'}"]),
                           cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    second = _sweeps(client)[1].info.run_id
    kids = _children(client, second)
    reused = [c for c in kids if REUSED_TAG in c.data.tags]
    trained = [c for c in kids if REUSED_TAG not in c.data.tags]
    assert len(kids) == 8 and all(c.info.status == "FINISHED" for c in kids)
    assert {c.data.tags["mnistlab.config_hash"] for c in reused} == done_first
    assert len(trained) == 8 - len(done_first)
    for c in reused:  # the stand-in carries the original's numbers and curves
        original = client.get_run(c.data.tags[REUSED_TAG])
        assert c.data.metrics["test/acc"] == original.data.metrics["test/acc"]
        assert [m.value for m in client.get_metric_history(c.info.run_id, "val/acc")] == \
               [m.value for m in client.get_metric_history(original.info.run_id, "val/acc")]
    # an ad-hoc sweep reports into its own dir and parent run, never into the project's reports/
    assert (tmp_path / "s2" / "study.md").is_file() and not (tmp_path / "reports").exists()

    # 3. one more seed: only the new seed's 4 trials train
    third = subprocess.run(_sweep_cmd(tmp_path, processed_dir, 3, [f"hydra.sweep.dir={tmp_path / 's3'}"]),
                           cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    kids = _children(client, _sweeps(client)[2].info.run_id)
    trained = [c for c in kids if REUSED_TAG not in c.data.tags]
    assert len(kids) == 12 and {c.data.params["seed"] for c in trained} == {"2"} and len(trained) == 4

    # 4. the per-config table equals a direct computation from the runs' metrics in MLflow
    groups: dict[tuple, list] = {}
    for c in kids:
        groups.setdefault((c.data.params["optimizer"], float(c.data.params["lr"])), []).append(c.data.metrics)
    table = {(r["optimizer"], float(r["lr"])): r for r in read_csv(tmp_path / "s3" / "study.csv")}
    assert set(table) == set(groups)
    for key, ms in groups.items():
        for metric, col in (("val/acc_best", "val"), ("test/acc", "test")):
            xs = [m[metric] for m in ms]
            mean, sd = statistics.fmean(xs), statistics.stdev(xs)
            half = stats.t.ppf(0.975, len(xs) - 1) * sd / math.sqrt(len(xs))
            row = table[key]
            assert int(row["finished"]) == 3
            assert float(row[f"{col}_mean"]) == pytest.approx(mean, abs=1e-6)
            if sd > 0:
                assert float(row[f"{col}_ci_low"]) == pytest.approx(mean - half, abs=1e-6)
                assert float(row[f"{col}_ci_high"]) == pytest.approx(mean + half, abs=1e-6)

    # 5. reuse_finished=false forces retraining
    forced = subprocess.run(_sweep_cmd(tmp_path, processed_dir, 1, ["reuse_finished=false", "study.optimizers=[sgd]",
                                                                    "study.lrs=[0.03]", f"hydra.sweep.dir={tmp_path / 's4'}"]),
                            cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert forced.returncode == 0, forced.stderr[-3000:]
    (kid,) = _children(client, _sweeps(client)[3].info.run_id)
    assert REUSED_TAG not in kid.data.tags and kid.info.status == "FINISHED"


@pytest.mark.slow
def test_dvc_exp_run_reaches_the_study_stage_and_metrics_are_numbers(project_copy, tmp_path):
    """`dvc exp run -S study.*` (real DVC, Hydra composition) runs the study stage with those values."""
    from conftest import fake_mnist, write_npz

    mirror = tmp_path / "mirror"
    write_npz(mirror, fake_mnist())
    env = cli_env()

    def dvc(*args, timeout=600):
        proc = subprocess.run(["dvc", *args], cwd=project_copy, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc

    dvc("remote", "modify", "--local", "mnist-source", "url", str(mirror))
    sets = ["data.verify_checksums=false", "data.val_size=100", "study.optimizers=[sgd]", "study.lrs=[0.1]",
            "study.batch_sizes=[64]", "study.seeds=2", "study.max_epochs=1", "study.refine_rounds=0",
            "study.confirm_seeds=0"]  # explore alone (the stages: test_staged_study_...)
    dvc("exp", "run", *[a for s in sets for a in ("-S", s)], "study/dvc.yaml")
    rows = read_csv(project_copy / "reports" / "sweep.csv")
    assert [(r["stage"], r["optimizer"], r["lr"], r["batch_size"], r["seed"]) for r in rows] == [
        ("explore", "sgd", "0.1", "64", "0"), ("explore", "sgd", "0.1", "64", "1")]
    shown = json.loads(dvc("metrics", "show", "--json").stdout)
    study = shown[""]["data"]["reports/study.json"]["data"]
    assert study["trials"] == 2 and study["seeds"] == 2
    leaves = []

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        else:
            leaves.append(x)

    walk(study)
    assert all(isinstance(v, (int, float)) for v in leaves), "dvc metrics show gets numbers, not ids or names"
    lock = (project_copy / "study" / "dvc.lock").read_text()
    assert "seeds: 2" in lock and "mnistlab-study --optimizers sgd --lrs 0.1 --batch_sizes 64 --seeds 2" in lock
    assert "--refine_rounds 0" in lock and "--confirm_seeds 0" in lock


@pytest.mark.slow
def test_staged_study_refines_the_edge_confirms_on_fresh_seeds_and_a_rerun_trains_nothing(tmp_path, processed_dir):
    """mnistlab-study on real Hydra multiruns: explore (2 lrs, both edges), one refine round outward from the best,
    the chosen config on 3 fresh confirmation seeds and at a longer budget; all under one study run; the champion
    comes from a confirmation seed; the same command again reuses every trial."""
    from mnistlab.study import half_decade
    from mnistlab.tracking.tags import STAGE_TAG, STUDY_TAG

    cmd = [str(Path(sys.executable).parent / "mnistlab-study"), "--optimizers", "sgd", "--lrs", "0.1", "1.0",
           "--batch_sizes", "64", "--seeds", "2", "--max_epochs", "1", "--refine_rounds", "1", "--confirm_seeds", "3",
           "--longer_epochs", "2", f"data.processed_dir={processed_dir}", "data.val_size=100", "data.eval_batch_size=100",
           f"paths.root={tmp_path}", f"paths.mlruns_dir={tmp_path / 'mlruns'}", f"paths.sweep_reports_dir={tmp_path / 'reports'}",
           "logger.plots=false", "num_threads=1", f"hydra.sweep.dir={tmp_path / 'sweeps'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_csv(tmp_path / "reports" / "sweep.csv")
    by_stage = {}
    for r in rows:
        by_stage.setdefault(r["stage"], []).append(r)
    assert sorted(by_stage) == ["confirm", "explore", "longer", "refine"], sorted(by_stage)
    explore = by_stage["explore"]
    assert sorted((r["lr"], r["seed"]) for r in explore) == [("0.1", "0"), ("0.1", "1"), ("1.0", "0"), ("1.0", "1")]
    means = {lr: statistics.fmean(float(r["val/acc_best"]) for r in explore if r["lr"] == lr) for lr in ("0.1", "1.0")}
    best = max(means, key=means.get)
    outward = half_decade(float(best), 1 if best == "1.0" else -1)
    assert {float(r["lr"]) for r in by_stage["refine"]} == {outward} and len(by_stage["refine"]) == 2
    study = json.loads((tmp_path / "reports" / "study.json").read_text())
    chosen = study["chosen_on_val"]["sgd"]
    confirm = by_stage["confirm"]
    assert sorted(int(r["seed"]) for r in confirm) == [1000, 1001, 1002], "fresh seeds, disjoint from 0-1"
    assert {(float(r["lr"]), int(r["batch_size"])) for r in confirm} == {(chosen["lr"], 64)}
    assert chosen["test_seeds"] == 3 and chosen["test_acc_mean"] == pytest.approx(
        statistics.fmean(float(r["test/acc"]) for r in confirm), abs=1e-6)
    assert {(r["seed"], r["epochs"]) for r in by_stage["longer"]} == {("1000", "2"), ("1001", "2"), ("1002", "2")}
    client = MlflowClient(default_tracking_uri(tmp_path / "mlruns"))
    (parent,) = [r for r in _sweeps(client) if r.data.tags.get(STUDY_TAG) == "true"]
    assert parent.info.status == "FINISHED"
    stages = _children(client, parent.info.run_id)
    assert sorted(s.data.tags[STAGE_TAG] for s in stages) == ["confirm", "explore", "longer", "refine"]
    champion = client.get_model_version_by_alias("mnist-mlp", "champion")
    assert champion.tags["mnistlab.run_id"] in {r["run_id"] for r in confirm}

    again = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = read_csv(tmp_path / "reports" / "sweep.csv")
    assert len(rerun) == len(rows) and all(r["reused"] for r in rerun), "a re-run trains nothing"
