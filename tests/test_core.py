"""The pure core on hand-built inputs (issue 26): the study statistics against independent computations (scipy's
t-test routes, not the interval formula report.py uses), the config hash (what changes it, what does not), and the
stacked planner (caps, seed-major order, the trials it refuses and why). No training, no store."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf, open_dict
from scipy import stats

from conftest import compose
from mnistlab.metrics import OBJECTIVE
from mnistlab.report import (
    _lr_ranges, bracket, choose, config_rows, findings_markdown, holm_adjust, mean_ci, metrics_json,
    min_detectable_difference, paired_difference, summarize,
)
from mnistlab.stacked.plan import plan
from mnistlab.study import half_decade, refine_proposals
from mnistlab.tracking.resume import config_hash


def _trial(opt: str, lr: float, seed: int, val: float | None, test: float | None, status: str = "FINISHED",
           bs: int = 128, stage: str = "explore") -> dict:
    return {"stage": stage, "optimizer": opt, "lr": lr, "batch_size": bs, "momentum": None, "seed": seed, OBJECTIVE: val,
            "test/acc": test, "epochs": 5, "fit_seconds": 1.0, "status": status, "reused": "", "run_id": f"{opt}{lr}{seed}"}


def statistics_mean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs)


# --- statistics ---

def test_mean_ci_is_the_t_interval_scipy_gives():
    values = [0.9712, 0.9755, 0.9731, 0.9790, 0.9748]
    got = mean_ci(values)
    want = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)  # another scipy route to the same interval
    assert got["mean"] == pytest.approx(sum(values) / 5, abs=1e-15)
    assert got["sd"] == pytest.approx(stats.tstd(values), rel=1e-12)
    assert (got["low"], got["high"]) == (pytest.approx(want.low, abs=1e-12), pytest.approx(want.high, abs=1e-12))


@pytest.mark.parametrize("values, mean", [([], math.nan), ([0.97], 0.97)])
def test_mean_ci_below_two_values_has_no_interval(values, mean):
    got = mean_ci(values)
    assert (math.isnan(got["mean"]) if math.isnan(mean) else got["mean"] == mean)
    assert all(math.isnan(got[k]) for k in ("sd", "low", "high"))


def test_mean_ci_of_equal_values_is_the_point():
    assert mean_ci([0.98, 0.98, 0.98]) == {"mean": 0.98, "sd": 0.0, "low": 0.98, "high": 0.98}


def test_paired_difference_pairs_seeds_both_finished_as_a_paired_t_test_does():
    a = [_trial("sgd", 0.1, s, 0.97, t) for s, t in enumerate([0.9700, 0.9721, 0.9688, 0.9730])]
    b = [_trial("rmsprop", 0.001, s, 0.97, t) for s, t in enumerate([0.9690, 0.9701, 0.9695, 0.9702])]
    b.append(_trial("rmsprop", 0.001, 4, 0.97, 0.99))  # seed 4: only b has it
    a[3] = _trial("sgd", 0.1, 3, None, None, status="FAILED")  # seed 3: a failed, so not paired
    (ca,), (cb,) = config_rows(a), config_rows(b)
    got = paired_difference(ca, cb)
    xa, xb = [0.9700, 0.9721, 0.9688], [0.9690, 0.9701, 0.9695]
    want = stats.ttest_rel(xa, xb).confidence_interval(0.95)
    assert got["n"] == 3
    assert got["mean"] == pytest.approx(statistics_mean([x - y for x, y in zip(xa, xb)]), abs=1e-15)
    assert (got["low"], got["high"]) == (pytest.approx(want.low, abs=1e-12), pytest.approx(want.high, abs=1e-12))
    assert got["excludes_zero"] == (want.low > 0 or want.high < 0)


def test_paired_difference_of_a_constant_shift_excludes_zero_and_of_one_seed_says_nothing():
    a = [_trial("sgd", 0.1, s, 0.97, 0.970 + s / 1000) for s in range(3)]
    b = [_trial("momentum", 0.01, s, 0.97, 0.968 + s / 1000) for s in range(3)]
    d = paired_difference(config_rows(a)[0], config_rows(b)[0])
    assert d["n"] == 3 and d["sd"] == pytest.approx(0.0, abs=1e-15) and d["excludes_zero"]
    assert d["mean"] == pytest.approx(0.002, abs=1e-12)
    one = paired_difference(config_rows(a[:1])[0], config_rows(b[:1])[0])
    assert one["n"] == 1 and math.isnan(one["low"]) and not one["excludes_zero"]


def _holm_by_definition(ps: list[float], alpha: float = 0.05) -> list[bool]:
    """Holm's procedure as stated: sort, reject while p_(i) <= alpha / (m - i), stop at the first that is not."""
    order, rejected = sorted(range(len(ps)), key=lambda i: ps[i]), [False] * len(ps)
    for step, i in enumerate(order):
        if ps[i] > alpha / (len(ps) - step):
            break
        rejected[i] = True
    return rejected


def test_holm_adjusted_pairs_match_the_procedure_and_scipy_intervals():
    diffs = {("a", "b"): [0.004, 0.006, 0.005, 0.007], ("a", "c"): [0.001, -0.002, 0.003, 0.0005],
             ("b", "c"): [0.0021, 0.0018, 0.0030, 0.0024]}
    pairs = []
    for (x, y), d in diffs.items():
        m, sd, n = statistics_mean(d), stats.tstd(d), len(d)
        pairs.append({"a": x, "b": y, "mean": m, "sd": sd, "n": n, "p": stats.ttest_1samp(d, 0.0).pvalue})
    holm_adjust(pairs)
    ps = [p["p"] for p in pairs]
    assert [p["resolved"] for p in pairs] == _holm_by_definition(ps)
    for step, p in enumerate(sorted(pairs, key=lambda p: p["p"])):
        level = 1 - 0.05 / (3 - step)  # the step's level; scipy's interval of the same differences at that level
        want = stats.ttest_1samp(diffs[(p["a"], p["b"])], 0.0).confidence_interval(level)
        assert (p["holm_low"], p["holm_high"]) == (pytest.approx(want.low, abs=1e-12), pytest.approx(want.high, abs=1e-12))
    assert all(p["p_holm"] >= p["p"] for p in pairs)


def test_min_detectable_difference_has_the_stated_power_by_simulation():
    rng = __import__("numpy").random.default_rng(0)
    sd, n = 0.003, 10
    mdd = min_detectable_difference(sd, n)
    x = rng.normal(mdd, sd, size=(40_000, n))
    t = x.mean(1) / (x.std(1, ddof=1) / math.sqrt(n))
    power = (abs(t) > stats.t.ppf(0.975, n - 1)).mean()
    assert power == pytest.approx(0.8, abs=0.01)
    assert min_detectable_difference(sd, 2) > min_detectable_difference(sd, 3) > mdd  # finite at 1 dof too
    assert math.isnan(min_detectable_difference(sd, 1))


def test_a_config_with_a_seed_at_chance_is_collapsed_shown_by_range_and_never_chosen():
    trials = [_trial("momentum", 1.0, s, v, t, bs=32) for s, (v, t) in enumerate([(0.1135, 0.1135), (0.97, 0.968),
                                                                                  (0.1135, 0.1135)])]
    trials += [_trial("momentum", 0.1, s, 0.96, 0.96 + s / 1000, bs=32) for s in range(3)]
    configs = {c["lr"]: c for c in config_rows(trials)}
    bad = configs[1.0]
    assert bad["collapsed"] == 2 and bad["failed"] == 0
    assert (bad["test_ci_low"], bad["test_ci_high"]) == (0.1135, 0.968)  # the seeds' range, not a t-interval
    assert configs[0.1]["collapsed"] == 0 and choose(list(configs.values()))["lr"] == 0.1
    md = findings_markdown(summarize(trials))
    assert "- momentum lr=1 bs=32: 2 of 3 collapsed (val acc 11.35-97.00 %)" in md, md


def test_choose_prefers_configs_whose_every_seed_finished():
    trials = [_trial("sgd", 1.0, s, 0.99, 0.99) for s in range(2)] + [_trial("sgd", 1.0, 2, None, None, "FAILED")]
    trials += [_trial("sgd", 0.1, s, 0.97, 0.97) for s in range(3)]
    configs = config_rows(trials)
    by = {c["config"]: c for c in configs}
    assert (by["sgd lr=1 bs=128"]["finished"], by["sgd lr=1 bs=128"]["failed"]) == (2, 1)
    assert choose(configs)["config"] == "sgd lr=0.1 bs=128"  # higher mean val, but one seed failed
    assert choose([by["sgd lr=1 bs=128"]])["config"] == "sgd lr=1 bs=128"  # the only one: chosen, said as partial
    assert choose(config_rows([_trial("sgd", 1.0, 0, None, None, "FAILED")])) is None


def test_usable_lrs_are_those_within_the_margin_of_the_best_and_never_a_failed_one():
    trials = [_trial("sgd", lr, s, v, 0.97) for lr, v in ((0.01, 0.950), (0.1, 0.975), (1.0, 0.972)) for s in range(2)]
    trials += [_trial("sgd", 3.0, 0, 0.979, 0.97), _trial("sgd", 3.0, 1, None, None, "FAILED")]
    assert _lr_ranges(config_rows(trials), "sgd", 0.975) == "bs 128: 0.1, 1 (1.0 decades)"


# --- the config hash ---

BASE = ["optimizer=sgd", "optimizer.lr=0.1", "seed=0"]


@pytest.mark.parametrize("override, changes", [
    ("optimizer.lr=0.2", True), ("seed=1", True), ("data.batch_size=32", True), ("optimizer=momentum", True),
    ("model.hidden_sizes=[256]", True), ("model=cnn", True), ("trainer.max_epochs=3", True),
    ("trainer.precision=bf16-mixed", True), ("data.val_size=4000", True), ("compile=default", True),
    ("paths.mlruns_dir=/elsewhere", False), ("logger=none", False), ("num_threads=1", False),
    ("trainer.enable_progress_bar=false", False), ("callbacks.rich_progress_bar=null", False),
    ("trainer.log_every_n_steps=7", False), ("reuse_finished=true", False), ("task_name=other", False),
    ("callbacks.model_checkpoint.save_last=false", False), ("data.processed_dir=/other/data", False),
])
def test_the_config_hash_covers_what_changes_a_result_and_nothing_else(override, changes):
    base = config_hash(compose(BASE), "abc")
    assert (config_hash(compose(BASE + [override]), "abc") != base) is changes


def test_the_config_hash_covers_the_data():
    assert config_hash(compose(BASE), "abc") != config_hash(compose(BASE), "abd")
    assert config_hash(compose(BASE), "abc") == config_hash(compose(BASE), "abc")


# --- the stacked planner ---

def _cfgs(overrides: list[list[str]]) -> list:
    out = []
    for i, o in enumerate(overrides):
        cfg = compose(["reuse_finished=false", *o])
        with open_dict(cfg):
            cfg.hydra = OmegaConf.create({"job": {"num": i}})
        out.append(cfg)
    return out


def test_the_planner_groups_by_key_caps_stacks_and_orders_members_seed_major():
    grid = [[f"optimizer={o}", f"seed={s}"] for s in (0, 1) for o in ("sgd", "momentum", "rmsprop")]
    cfgs = _cfgs(grid + [["optimizer=sgd", "seed=0", "data.batch_size=32"]])
    groups, alone = plan(cfgs, max_members=4, mem_per_member_mb=1.0, root=None, workers=1)
    assert alone == [6]  # batch 32: no other trial shares its settings
    assert sorted(map(len, groups)) == [3, 3]  # 6 members, at most 4 per stack: two even stacks
    seeds = [[int(cfgs[i].seed) for i in g] for g in groups]
    assert seeds == [[0, 0, 0], [1, 1, 1]]  # seed-major: a stack of one seed shares its batches


@pytest.mark.parametrize("override, why", [
    ("optimizer=adam", "optimizer adam (torch.optim.Adam) has no stacked update"),
    ("model.dropout=0.2", "dropout needs each member's own random masks"),
    ("model=cnn", "model mnistlab.nets.SmallCNN has no stacked form"),
    ("callbacks=early_stopping", "callbacks.early_stopping is not stacked"),
    ("compile=default", "compile is not stacked"),
    ("trainer.precision=bf16-mixed", "only precision 32-true is stacked"),
])
def test_the_planner_refuses_what_a_stack_cannot_train_and_says_why(override, why, caplog):
    cfgs = _cfgs([["optimizer=sgd", "seed=0"], ["optimizer=rmsprop", "seed=0"], [override]])
    with caplog.at_level("INFO", logger="mnistlab.stacked"):
        groups, alone = plan(cfgs, max_members=12, mem_per_member_mb=1.0, root=None)
    assert groups == [[0, 1]] and alone == [2]
    assert f"trial 2 trains on its own, not stacked: {why}" in caplog.text


def test_the_planner_runs_another_apps_jobs_one_by_one(caplog):
    other = OmegaConf.create({"foo": 1, "hydra": {"job": {"num": 0}}})
    with caplog.at_level("INFO", logger="mnistlab.stacked"):
        groups, alone = plan([other], max_members=12, mem_per_member_mb=1.0, root=None)
    assert (groups, alone) == ([], [0])
    assert "not an mnistlab trial (its config has no seed, model, optimizer" in caplog.text


# --- the staged study: refine brackets each optimum, confirm seeds alone give the reported test ---

def test_half_decade_steps_are_the_grid_10_to_the_k_over_2():
    assert [half_decade(1.0, k) for k in (-2, -1, 1, 2)] == [0.1, 0.316, 3.16, 10.0]
    assert half_decade(0.316, 1) == 1.0 and half_decade(0.001, -1) == 0.000316


def test_refine_extends_an_edge_optimum_outward_round_by_round_until_bracketed():
    """A synthetic val curve peaking at lr 3e-4 (below the grid): each round proposes the next lr below the
    bottom edge, and stops proposing once a worse lr sits on both sides; the upper edge collapsed = bracketed."""
    def val(lr):  # peak at 10^-3.5, falling 1 pp per half decade
        return 0.975 - 0.01 * abs(2 * math.log10(lr) + 7)

    lrs, rounds = [0.001, 0.01, 0.1, 1.0], []
    while True:
        trials = [_trial("rmsprop", lr, s, val(lr) + s / 1e4, 0.97) for lr in lrs for s in range(3)]
        trials += [_trial("sgd", lr, s, 0.1135 if lr == 1.0 else 0.90 + lr / 10, 0.9) for lr in (0.01, 0.1, 1.0)
                   for s in range(3)]  # sgd: best at 0.1, lr 1 collapsed above it
        proposals = refine_proposals(config_rows(trials))
        assert ("sgd", 128) not in proposals, "a collapsed neighbour above brackets the optimum"
        if not proposals:
            break
        rounds.append(proposals[("rmsprop", 128)])
        lrs.append(rounds[-1])
        assert len(rounds) < 5
    assert rounds == [0.000316, 0.0001]  # 3.16e-4 is the best once tried; 1e-4 below it is worse: bracketed
    b = bracket(config_rows(trials), "rmsprop", 128)
    assert b["bracketed"] and b["best"]["lr"] == 0.000316 and (b["below"]["lr"], b["above"]["lr"]) == (0.0001, 0.001)
    top = bracket(config_rows([_trial("sgd", lr, 0, lr, 0.9) for lr in (0.1, 1.0)]), "sgd", 128)
    assert not top["bracketed"] and top["above"] is None
    assert refine_proposals(config_rows([_trial("sgd", lr, 0, lr, 0.9) for lr in (0.1, 1.0)])) == {("sgd", 128): 3.16}


def test_test_accuracy_is_reported_from_the_confirmation_seeds_alone():
    """Selection seeds carry a lucky test score; the reported test, its CI and the paired differences come from the
    confirmation seeds, which never enter the choice."""
    trials = [_trial(o, 0.1, s, v + s / 1000, 0.999) for o, v in (("sgd", 0.97), ("momentum", 0.96)) for s in range(3)]
    trials += [_trial("sgd", 1.0, s, 0.99, 0.5, stage="confirm") for s in range(1000, 1010)]  # not a selection config
    conf = {("sgd", s): 0.970 + (s % 3) / 1000 for s in range(1000, 1010)}
    conf.update({("momentum", s): 0.968 + (s % 5) / 1000 for s in range(1000, 1010)})
    trials += [_trial(o, 0.1, s, 0.97, t, stage="confirm") for (o, s), t in conf.items()]
    summary = summarize(trials)
    assert summary["chosen"]["sgd"]["lr"] == 0.1 and summary["chosen"]["sgd"]["finished"] == 3
    rep = summary["reported"]["sgd"]
    sgd_conf = [conf[("sgd", s)] for s in range(1000, 1010)]
    assert rep["finished"] == 10 and rep["test_mean"] == pytest.approx(statistics_mean(sgd_conf))
    want = stats.ttest_1samp(sgd_conf, 0).confidence_interval(0.95)
    assert (rep["test_ci_low"], rep["test_ci_high"]) == (pytest.approx(want.low), pytest.approx(want.high))
    (pair,) = summary["pairs"]
    diffs = [conf[("momentum", s)] - conf[("sgd", s)] for s in range(1000, 1010)]
    assert pair["n"] == 10 and pair["mean"] == pytest.approx(statistics_mean(diffs))
    assert pair["p"] == pytest.approx(stats.ttest_rel([conf[("momentum", s)] for s in range(1000, 1010)], sgd_conf).pvalue)
    m = metrics_json(summary)
    assert m["chosen_on_val"]["sgd"]["test_seeds"] == 10 and m["chosen_on_val"]["sgd"]["confirmed"] == 1
    assert m["stages"] == {"explore": 6, "confirm": 30}
    md = findings_markdown(summary)
    assert "test accuracy comes from fresh confirmation seeds" in md and "| 10 (confirm) |" in md, md
