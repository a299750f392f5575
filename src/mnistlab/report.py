"""The sweep report, read back from MLflow: chosen on validation, reported on test, with seeds and intervals.

Files (in the sweep dir, on the parent run, and in reports/ for the study stage):
  sweep.csv   one row per trial (a config x a seed)
  study.csv   one row per config: n finished/failed/collapsed, mean, sd, 95 % CI of val/acc_best and test/acc (for a
              config with a collapsed seed, at chance: the seeds' range instead of a t-interval)
  study.json  the chosen config per optimizer, numbers only (what `dvc metrics show` prints)
  study.md    the findings, generated: chosen configs, paired differences (Holm-adjusted, with the minimum
              detectable difference), usable lr ranges, failed and collapsed configs
  sweep.png   mean +- CI against lr per optimizer and batch size; val curves of each chosen config
`mnistlab-report` rebuilds them for the latest (or a given) sweep.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
from itertools import combinations
from pathlib import Path

from mnistlab.metrics import OBJECTIVE
from mnistlab.outputs import write_atomic
from mnistlab.tracking.store import project_store
from mnistlab.tracking.tags import PARENT_TAG, REUSED_TAG, STAGE_TAG, SWEEP_TAG

REPORTED = "test/acc"  # what is reported for the chosen configs; never used to choose
CI_LEVEL = 0.95
USABLE_MARGIN = 0.005  # an lr is "usable" when its config's mean val acc is within 0.5 pp of the optimizer's best
COLLAPSE_ACC = 0.2  # a finished seed at most twice chance (10 classes) has collapsed: it predicts one or two classes
POWER = 0.8  # for the minimum detectable difference of a paired comparison
# the study's stages (study.py); a plain sweep's trials have no stage and count as exploration
EXPLORE, REFINE, CONFIRM, LONGER = "explore", "refine", "confirm", "longer"
TARGET_ACC = 0.97  # the speed-to-target finding: epochs (and steps) until val/acc first reaches it
TRIAL_COLUMNS = ["stage", "optimizer", "lr", "batch_size", "momentum", "seed", OBJECTIVE, REPORTED, "epochs",
                 "fit_seconds", "status", "reused", "run_id"]
CONFIG_COLUMNS = ["config", "optimizer", "lr", "batch_size", "n", "finished", "failed", "collapsed",
                  "val_mean", "val_sd", "val_ci_low", "val_ci_high", "test_mean", "test_sd", "test_ci_low",
                  "test_ci_high", "fit_seconds_mean"]


def _num(x, cast=float):
    try:
        return cast(x)
    except (TypeError, ValueError):
        return None


def config_label(r: dict) -> str:
    """A config's stable name (no run-name suffixes): 'momentum lr=0.1 bs=128'."""
    lr = "?" if r["lr"] is None else f"{r['lr']:g}"  # a trial that failed before its params were logged
    return f"{r['optimizer'] or '?'} lr={lr} bs={r['batch_size'] if r['batch_size'] is not None else '?'}"


def trial_rows(client, parent_run_id: str) -> list[dict]:
    """One dict per trial of the sweep (or of each stage sweep of a study), sorted by stage, optimizer, batch
    size, lr, seed."""
    exp = client.get_run(parent_run_id).info.experiment_id

    def children(run_id: str) -> list:
        return client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{run_id}'", max_results=5000)

    rows = []
    for r in children(parent_run_id):
        if r.data.tags.get(SWEEP_TAG) == "true":  # a stage sweep of a study
            rows += [_trial_row(t, r.data.tags.get(STAGE_TAG, EXPLORE)) for t in children(r.info.run_id)]
        else:
            rows.append(_trial_row(r, EXPLORE))
    order = {EXPLORE: 0, REFINE: 1, CONFIRM: 2, LONGER: 3}
    rows.sort(key=lambda d: (order.get(d["stage"], 9), d["optimizer"], d["batch_size"] or 0, d["lr"] or 0,
                             d["seed"] or 0))
    return rows


def _trial_row(r, stage: str) -> dict:
    p, m = r.data.params, r.data.metrics
    finished = r.info.status == "FINISHED"
    return {
        "stage": stage,
        "optimizer": p.get("optimizer", ""),
        "lr": _num(p.get("lr")),
        "batch_size": _num(p.get("batch_size"), int),
        "momentum": _num(p.get("momentum")),
        "seed": _num(p.get("seed"), int),
        OBJECTIVE: m.get(OBJECTIVE) if finished else None,
        "test/acc": m.get(REPORTED) if finished else None,
        "epochs": _num(m.get("epochs"), int),
        "samples_seen": m.get("samples_seen"),
        "fit_seconds": m.get("fit_seconds"),
        "status": r.info.status,
        "reused": r.data.tags.get(REUSED_TAG, ""),
        "run_id": r.info.run_id,
    }


def selection_trials(trials: list[dict]) -> list[dict]:
    """The trials a config is chosen on: explore and refine, never the confirmation or longer-budget seeds."""
    return [t for t in trials if t.get("stage", EXPLORE) in (EXPLORE, REFINE)]


def mean_ci(values: list[float]) -> dict:
    """Mean, sd and the 95 % Student-t interval of the mean (nan where n < 2)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return {"mean": math.nan, "sd": math.nan, "low": math.nan, "high": math.nan}
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "sd": math.nan, "low": math.nan, "high": math.nan}
    sd = statistics.stdev(values)
    if sd == 0:
        return {"mean": mean, "sd": 0.0, "low": mean, "high": mean}
    low, high = stats.t.interval(CI_LEVEL, n - 1, loc=mean, scale=sd / math.sqrt(n))
    return {"mean": mean, "sd": sd, "low": float(low), "high": float(high)}


def _ok(r: dict) -> bool:
    return r["status"] == "FINISHED" and r[OBJECTIVE] is not None and not math.isnan(r[OBJECTIVE])


def config_rows(trials: list[dict]) -> list[dict]:
    """One row per config (the trials that differ only in seed), with its seeds' statistics."""
    groups: dict[str, list[dict]] = {}
    for t in trials:
        groups.setdefault(config_label(t), []).append(t)
    out = []
    for label, ts in groups.items():
        ok = [t for t in ts if _ok(t)]
        val, test = mean_ci([t[OBJECTIVE] for t in ok]), mean_ci([t[REPORTED] for t in ok if t[REPORTED] is not None])
        collapsed = sum(t[OBJECTIVE] <= COLLAPSE_ACC for t in ok)
        if collapsed:  # a seed at chance is not noise around a mean: its range, not a t-interval
            val = {**val, "low": min(t[OBJECTIVE] for t in ok), "high": max(t[OBJECTIVE] for t in ok)}
            tests = [t[REPORTED] for t in ok if t[REPORTED] is not None]
            test = {**test, "low": min(tests, default=math.nan), "high": max(tests, default=math.nan)}
        secs = [t["fit_seconds"] for t in ok if t["fit_seconds"] is not None]
        out.append({
            "config": label, "optimizer": ts[0]["optimizer"], "lr": ts[0]["lr"], "batch_size": ts[0]["batch_size"],
            "n": len(ts), "finished": len(ok), "failed": len(ts) - len(ok), "collapsed": collapsed,
            "val_mean": val["mean"], "val_sd": val["sd"], "val_ci_low": val["low"], "val_ci_high": val["high"],
            "test_mean": test["mean"], "test_sd": test["sd"], "test_ci_low": test["low"], "test_ci_high": test["high"],
            "fit_seconds_mean": statistics.fmean(secs) if secs else math.nan,
            "trials": ts,
        })
    out.sort(key=lambda c: (c["optimizer"], c["batch_size"] or 0, c["lr"] or 0))
    return out


def choose(configs: list[dict]) -> dict | None:
    """The config with the highest mean validation accuracy, among those whose every seed finished and none collapsed
    (a config that diverges for some seed is not a safe choice); else among those with any finished seed."""
    for eligible in ([c for c in configs if c["finished"] and not c["failed"] and not c["collapsed"]],
                     [c for c in configs if c["finished"]]):
        if eligible:
            return max(eligible, key=lambda c: c["val_mean"])
    return None


def paired_difference(a: dict, b: dict) -> dict:
    """Test-accuracy difference a - b over the seeds both finished (same seed = same init and batch order)."""
    ta = {t["seed"]: t[REPORTED] for t in a["trials"] if _ok(t)}
    tb = {t["seed"]: t[REPORTED] for t in b["trials"] if _ok(t)}
    seeds = sorted(set(ta) & set(tb))
    diffs = [ta[s] - tb[s] for s in seeds]
    d = mean_ci(diffs)
    d["n"] = len(seeds)
    d["excludes_zero"] = bool(d["low"] > 0 or d["high"] < 0)
    d["p"] = _paired_p(d["mean"], d["sd"], len(seeds))
    d["mdd"] = min_detectable_difference(d["sd"], len(seeds))
    return d


def _paired_p(mean: float, sd: float, n: int) -> float:
    """Two-sided p of the paired t-test on n differences (0 for a nonzero constant shift, nan for n < 2)."""
    from scipy import stats

    if n < 2 or math.isnan(sd):
        return math.nan
    if sd == 0:
        return 0.0 if mean != 0 else 1.0
    return float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def min_detectable_difference(sd: float, n: int, alpha: float = 1 - CI_LEVEL, power: float = POWER) -> float:
    """The smallest true paired difference a two-sided t-test on n seeds detects with `power`. The power is the
    noncentral t's, integrated over the chi-square of the variance (scipy's nct returns nan at 1-2 dof)."""
    from scipy import integrate, optimize, stats

    if n < 2 or math.isnan(sd) or sd == 0:
        return math.nan
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(nc: float) -> float:  # nc: the true difference in standard errors
        def rejects(v: float) -> float:
            c = crit * math.sqrt(v / df)
            return (stats.norm.sf(c - nc) + stats.norm.cdf(-c - nc)) * stats.chi2.pdf(v, df)

        return integrate.quad(rejects, 0, math.inf, limit=200)[0] - power

    high = crit + 1.0
    while shortfall(high) < 0:
        high *= 2
    return float(optimize.brentq(shortfall, 0.0, high, xtol=1e-10)) * sd / math.sqrt(n)


def holm_adjust(pairs: list[dict], alpha: float = 1 - CI_LEVEL) -> None:
    """Holm's step-down correction for the family of pairwise differences, in place: `p_holm` (adjusted p) and an
    interval at the level of its step (the i-th smallest p is tested at alpha / (m - i)), `resolved` when Holm
    rejects. Pairs without a p (n < 2) are left out of the family and unresolved."""
    from scipy import stats

    family = sorted((p for p in pairs if not math.isnan(p["p"])), key=lambda p: p["p"])
    m, running = len(family), 0.0
    for i, p in enumerate(family):
        running = max(running, min(1.0, (m - i) * p["p"]))
        p["p_holm"], level = running, 1 - alpha / (m - i)
        if p["sd"] > 0:
            half = stats.t.ppf(1 - (1 - level) / 2, p["n"] - 1) * p["sd"] / math.sqrt(p["n"])
            p["holm_low"], p["holm_high"] = p["mean"] - half, p["mean"] + half
        else:
            p["holm_low"] = p["holm_high"] = p["mean"]
        p["resolved"] = running < alpha
    for p in pairs:
        if math.isnan(p["p"]):
            p.update(p_holm=math.nan, holm_low=math.nan, holm_high=math.nan, resolved=False)


def bracket(configs: list[dict], opt: str, bs: int) -> dict | None:
    """Where (opt, bs)'s best lr (as `choose` picks it) sits among the lrs tried: its neighbours below and above
    (None at an edge). Bracketed when both exist: each is worse, failed or collapsed, so the optimum lies between."""
    group = sorted((c for c in configs if c["optimizer"] == opt and c["batch_size"] == bs and c["lr"]),
                   key=lambda c: c["lr"])
    best = choose(group)
    if best is None:
        return None
    i = group.index(best)
    below, above = (group[i - 1] if i else None), (group[i + 1] if i + 1 < len(group) else None)
    return {"optimizer": opt, "batch_size": bs, "best": best, "below": below, "above": above,
            "bracketed": below is not None and above is not None}


def _stage_config(trials: list[dict], stage: str, config: dict) -> dict | None:
    """`config` (a selection config row) as re-trained in `stage`, with those seeds' statistics; None if never."""
    ts = [t for t in trials if t.get("stage") == stage and config_label(t) == config["config"]]
    return config_rows(ts)[0] if ts else None


def summarize(trials: list[dict]) -> dict:
    """Counts, per-config statistics on the selection trials, the chosen config per optimizer and overall, and
    what is reported for each: its confirmation seeds when the study ran them (else the seeds that chose it)."""
    select = selection_trials(trials)
    configs = config_rows(select)
    chosen = {o: choose([c for c in configs if c["optimizer"] == o]) for o in sorted({c["optimizer"] for c in configs})}
    chosen = {o: c for o, c in chosen.items() if c is not None}
    confirmed = {o: _stage_config(trials, CONFIRM, c) for o, c in chosen.items()}
    reported = {o: confirmed[o] or c for o, c in chosen.items()}
    pairs = [{"a": a, "b": b, **paired_difference(reported[a], reported[b])} for a, b in combinations(sorted(chosen), 2)]
    holm_adjust(pairs)
    stages = {}
    for t in trials:
        stages[t.get("stage", EXPLORE)] = stages.get(t.get("stage", EXPLORE), 0) + 1
    return {
        "rows": trials, "trials": len(trials), "finished": sum(_ok(t) for t in trials), "failed": sum(not _ok(t) for t in trials),
        "reused": sum(bool(t["reused"]) for t in trials), "stages": stages, "configs": configs,
        "seeds": sorted({t["seed"] for t in select if t["seed"] is not None}),
        "chosen": chosen, "confirmed": {o: c for o, c in confirmed.items() if c}, "reported": reported,
        "longer": {o: c for o, c in ((o, _stage_config(trials, LONGER, c)) for o, c in chosen.items()) if c},
        "best": choose(configs), "pairs": pairs,
        "brackets": [b for b in (bracket(configs, o, bs) for o, bs in sorted({(c["optimizer"], c["batch_size"])
                                                                              for c in configs})) if b],
    }


def best_run(summary: dict) -> dict:
    """The overall chosen config's seed with the highest val accuracy, among its confirmation seeds when there are
    (the model a user would deploy)."""
    best = summary["best"]
    config = summary["confirmed"].get(best["optimizer"]) or best
    return max((t for t in config["trials"] if _ok(t)), key=lambda t: t[OBJECTIVE])


def _round(x, nd=6):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, nd)


def metrics_json(summary: dict) -> dict:
    """Numbers only, for `dvc metrics show`: counts per stage and each optimizer's chosen config (selected on
    validation; test from the seeds reported)."""
    out = {k: summary[k] for k in ("trials", "finished", "failed")}
    out["seeds"] = len(summary["seeds"])
    out["stages"] = dict(summary["stages"])
    out["chosen_on_val"] = {
        o: {"lr": c["lr"], "batch_size": c["batch_size"], "val_acc_mean": _round(c["val_mean"]),
            "test_acc_mean": _round(r["test_mean"]), "test_acc_ci95": _round((r["test_ci_high"] - r["test_ci_low"]) / 2),
            "test_seeds": r["finished"], "confirmed": int(o in summary["confirmed"])}
        for o, c in summary["chosen"].items() for r in [summary["reported"][o]]
    }
    return out


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None or (isinstance(r.get(k), float) and math.isnan(r[k]))
                    else (round(r[k], 6) if isinstance(r[k], float) else r[k]) for k in columns})
    return buf.getvalue()


def _pm(mean: float, low: float, high: float, pct: bool = True) -> str:
    f = 100 if pct else 1
    if math.isnan(mean):
        return "n/a"
    if math.isnan(low):
        return f"{mean * f:.2f}"
    return f"{mean * f:.2f} ± {(high - low) / 2 * f:.2f}"


def _lr_ranges(configs: list[dict], opt: str, best_val: float) -> str:
    parts = []
    for bs in sorted({c["batch_size"] for c in configs if c["optimizer"] == opt}):
        lrs = sorted(c["lr"] for c in configs if c["optimizer"] == opt and c["batch_size"] == bs and not c["failed"]
                     and not c["collapsed"] and c["finished"] and c["val_mean"] >= best_val - USABLE_MARGIN)
        width = f" ({math.log10(lrs[-1] / lrs[0]):.1f} decades)" if len(lrs) > 1 else ""
        parts.append(f"bs {bs}: " + (", ".join(f"{lr:g}" for lr in lrs) + width if lrs else "none"))
    return "; ".join(parts)


def _curve_mean(config: dict, key: str) -> list[float]:
    """The mean over a config's finished seeds of a per-epoch curve (attached by write_sweep_report)."""
    curves = [t["curves"][key] for t in config["trials"] if _ok(t) and t.get("curves", {}).get(key)]
    n = min((len(c) for c in curves), default=0)
    return [statistics.fmean(c[i] for c in curves) for i in range(n)]


def _steps_per_epoch(config: dict) -> int | None:
    t = next((t for t in config["trials"] if _ok(t) and t.get("samples_seen") and t["epochs"]), None)
    return None if t is None else math.ceil(t["samples_seen"] / t["epochs"] / t["batch_size"])


def _epochs_to_target(config: dict) -> list[int | None]:
    """Per finished seed: the first epoch (1-based) whose val/acc reaches TARGET_ACC, None if none did."""
    out = []
    for t in config["trials"]:
        curve = t.get("curves", {}).get("val/acc") if _ok(t) else None
        if curve:
            out.append(next((i + 1 for i, v in enumerate(curve) if v >= TARGET_ACC), None))
    return out


def _lr_scale(configs: list[dict]) -> float:
    """1 / (1 - β) for momentum configs (heavy-ball momentum's effective step is lr / (1 - β)); 1 for the others."""
    beta = next((t["momentum"] for c in configs if c["optimizer"] == "momentum" for t in c["trials"] if t["momentum"]),
                None)
    return 1 / (1 - beta) if beta and beta < 1 else 1.0


def _effective_lr_pairs(configs: list[dict]) -> list[tuple[dict, dict]]:
    """(momentum config at lr, SGD config at lr / (1 - momentum)) with the same batch size, where both were run."""
    sgd = {(c["batch_size"], round(math.log10(c["lr"]), 6)): c for c in configs if c["optimizer"] == "sgd" and c["lr"]}
    out = []
    for c in configs:
        scale = _lr_scale([c])
        if c["optimizer"] == "momentum" and c["lr"] and scale != 1.0:
            match = sgd.get((c["batch_size"], round(math.log10(c["lr"] * scale), 6)))
            if match is not None:
                out.append((c, match))
    return out


def findings_markdown(summary: dict) -> str:
    """The study's findings as Markdown, written from the data (the README quotes it)."""
    s, configs = summary, summary["configs"]
    stages = ", ".join(f"{n} {st}" for st, n in s["stages"].items())
    confirmed = bool(s["confirmed"])
    lines = [
        f"# Findings of the {'study' if len(s['stages']) > 1 else 'sweep'}", "",
        f"{s['trials']} trials ({stages}): {s['finished']} finished, {s['failed']} failed"
        + (f", {s['reused']} reused from earlier runs" if s["reused"] else "") + ". "
        f"Each config is **chosen on validation** (mean `val/acc_best` over seeds {_seed_span(s['seeds'])}, among configs "
        f"whose every seed finished and none collapsed) over the explore"
        + (" and refine" if REFINE in s["stages"] else "") + " trials; "
        + ("its **test accuracy comes from fresh confirmation seeds** that took no part in choosing it. "
           if confirmed else "its test accuracy is reported from the same seeds (no confirmation stage ran). ")
        + "Intervals are 95 % Student t over seeds (accuracy in %).", "",
        "## Chosen config per optimizer", "",
        "| optimizer | lr | batch | optimum bracketed? | val acc % (selection seeds) | test seeds | "
        "test acc % (mean ± CI) | final train loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    brackets = {(b["optimizer"], b["batch_size"]): b for b in s["brackets"]}
    for o, c in s["chosen"].items():
        r, b = s["reported"][o], brackets.get((o, c["batch_size"]))
        loss = _curve_mean(r, "train/loss")
        lines.append(f"| {o} | {c['lr']:g} | {c['batch_size']} | {_bracket_text(b)} | "
                     f"{_pm(c['val_mean'], c['val_ci_low'], c['val_ci_high'])} ({c['finished']}) | {r['finished']}"
                     f"{' (confirm)' if o in s['confirmed'] else ''} | {_pm(r['test_mean'], r['test_ci_low'], r['test_ci_high'])} | "
                     f"{f'{loss[-1]:.4f}' if loss else 'n/a'} |")
    if s["best"] is not None:
        b, r = s["best"], s["reported"][s["best"]["optimizer"]]
        lines += ["", f"Overall, by mean validation accuracy: **{b['config']}** "
                      f"(val {_pm(b['val_mean'], b['val_ci_low'], b['val_ci_high'])} %, "
                      f"test {_pm(r['test_mean'], r['test_ci_low'], r['test_ci_high'])} % on {r['finished']} seeds)."]
    if s["pairs"]:
        lines += ["", "## Differences between the chosen configs (test accuracy, paired by seed)", "",
                  f"Holm-adjusted over the {len(s['pairs'])} comparisons (family-wise 5 %); the minimum detectable "
                  f"difference is the true difference a paired t-test on these seeds finds with {POWER:.0%} power.", "",
                  "| difference | seeds | mean (pp) | Holm CI (pp) | Holm p | min. detectable (pp) | resolved? |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for p in s["pairs"]:
            if math.isnan(p["p"]):
                ci, pv, verdict = "n/a", "n/a", "cannot tell (fewer than 2 paired seeds)"
            else:
                ci = f"[{p['holm_low'] * 100:+.2f}, {p['holm_high'] * 100:+.2f}]"
                pv, verdict = f"{p['p_holm']:.3g}", ("yes" if p["resolved"] else "no: within seed noise")
            mdd = "n/a" if math.isnan(p["mdd"]) else f"{p['mdd'] * 100:.2f}"
            lines.append(f"| {p['a']} − {p['b']} | {p['n']} | {p['mean'] * 100:+.2f} | {ci} | {pv} | {mdd} | {verdict} |")
    lines += _optimum_lines(s) + _momentum_lines(configs) + _speed_lines(s) + _longer_lines(s)
    lines += ["", f"## Usable learning rates (mean val acc within {USABLE_MARGIN * 100:g} pp of the optimizer's best, "
                  "no failed or collapsed seed)", ""]
    for o, c in s["chosen"].items():
        lines.append(f"- **{o}**: {_lr_ranges(configs, o, c['val_mean'])}")
    failed = [c for c in configs if c["failed"] or c["collapsed"]]
    lines += ["", f"## Failed, diverged or collapsed configs (a finished seed at most {COLLAPSE_ACC:.0%} val acc)", ""]
    lines += [f"- {c['config']}: " + ", ".join(
        ([f"{c['failed']} of {c['n']} seed(s) failed"] if c["failed"] else [])
        + ([f"{c['collapsed']} of {c['n']} collapsed (val acc {c['val_ci_low'] * 100:.2f}-{c['val_ci_high'] * 100:.2f} %)"]
           if c["collapsed"] else [])) for c in failed] or ["- none"]
    return "\n".join(lines) + "\n"


def _seed_span(seeds: list[int]) -> str:
    return f"{seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else ", ".join(map(str, seeds))


def _bracket_text(b: dict | None) -> str:
    if b is None:
        return "n/a"
    if b["bracketed"]:
        return f"yes ({b['below']['lr']:g} and {b['above']['lr']:g} worse)"
    return f"no: at the {'top' if b['above'] is None else 'bottom'} of the lrs tried"


def _optimum_lines(s: dict) -> list[str]:
    """Best lr per (optimizer, batch size), bracketed or not, with the updates per epoch that batch size gives."""
    out = ["", "## Best learning rate per batch size (mean val acc; the optimum lies between the lrs around it)", "",
           "| optimizer | batch | updates/epoch | best lr | val acc % | lower lr | higher lr |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for b in s["brackets"]:
        c = b["best"]
        spe = _steps_per_epoch(c)
        side = [("edge" if n is None else f"{n['lr']:g}: " + ("collapsed" if n["collapsed"] else "failed" if n["failed"]
                 else f"{n['val_mean'] * 100:.2f}")) for n in (b["below"], b["above"])]
        out.append(f"| {b['optimizer']} | {b['batch_size']} | {spe or '?'} | {c['lr']:g} | "
                   f"{_pm(c['val_mean'], c['val_ci_low'], c['val_ci_high'])} | {side[0]} | {side[1]} |")
    for opt in sorted({b["optimizer"] for b in s["brackets"]}):
        bs = sorted((b for b in s["brackets"] if b["optimizer"] == opt), key=lambda b: b["batch_size"])
        if len(bs) > 1:
            lo, hi = bs[0], bs[-1]
            out.append(f"\n{opt}: batch {lo['batch_size']} -> {hi['batch_size']} ({hi['batch_size'] / lo['batch_size']:g}x the "
                       f"batch, 1/{hi['batch_size'] / lo['batch_size']:g} the updates) moves the best lr "
                       f"{lo['best']['lr']:g} -> {hi['best']['lr']:g} ({hi['best']['lr'] / lo['best']['lr']:.3g}x).")
    if not all(b["bracketed"] for b in s["brackets"]):
        out.append("\nNot bracketed: " + "; ".join(f"{b['optimizer']} bs {b['batch_size']} (best {b['best']['lr']:g})"
                                                   for b in s["brackets"] if not b["bracketed"]) + ".")
    return out


def _momentum_lines(configs: list[dict]) -> list[str]:
    pairs = _effective_lr_pairs(configs)
    if not pairs:
        return []
    out = ["", "## Momentum against SGD at the same effective lr η / (1 − β)", "",
           "| batch | momentum lr | SGD lr | momentum val % | SGD val % | difference (pp) |",
           "| --- | --- | --- | --- | --- | --- |"]
    diffs = []
    for m, g in sorted(pairs, key=lambda p: (p[0]["batch_size"], p[0]["lr"])):
        ok = not (m["collapsed"] or g["collapsed"] or m["failed"] or g["failed"])
        d = (m["val_mean"] - g["val_mean"]) * 100
        if ok:
            diffs.append(abs(d))
        out.append(f"| {m['batch_size']} | {m['lr']:g} | {g['lr']:g} | {m['val_mean'] * 100:.2f} | {g['val_mean'] * 100:.2f} | "
                   + (f"{d:+.2f} |" if ok else "collapsed or failed |"))
    if diffs:
        out.append(f"\nOver the {len(diffs)} matched pairs where neither collapsed, momentum at lr η and SGD at "
                   f"η / (1 − β) differ by at most {max(diffs):.2f} pp (median {statistics.median(diffs):.2f} pp): "
                   f"on this budget, heavy-ball momentum behaves like SGD with a larger step.")
    return out


def _speed_lines(s: dict) -> list[str]:
    rows = []
    for o, r in s["reported"].items():
        hits = _epochs_to_target(r)
        if not hits:
            continue
        reached = [h for h in hits if h is not None]
        spe = _steps_per_epoch(r)
        med = statistics.median(reached) if reached else None
        rows.append(f"| {o} | {r['config']} | {len(reached)} of {len(hits)} | "
                    + (f"{med:g} | {med * spe:,.0f} |" if med is not None and spe else "n/a | n/a |"))
    if not rows:
        return []
    return ["", f"## Speed to {TARGET_ACC:.0%} validation accuracy (the reported seeds of each chosen config)", "",
            "| optimizer | config | seeds that reach it | median epochs | updates |", "| --- | --- | --- | --- | --- |", *rows]


def _longer_lines(s: dict) -> list[str]:
    if not s["longer"]:
        return []
    out = ["", "## Does the choice hold at a longer budget? (the chosen configs, same seeds, more epochs)", "",
           "| optimizer | config | epochs | seeds | val acc % | test acc % |", "| --- | --- | --- | --- | --- | --- |"]
    for o, c in s["longer"].items():
        epochs = max((t["epochs"] or 0 for t in c["trials"]), default=0)
        out.append(f"| {o} | {c['config']} | {epochs} | {c['finished']} | {_pm(c['val_mean'], c['val_ci_low'], c['val_ci_high'])} | "
                   f"{_pm(c['test_mean'], c['test_ci_low'], c['test_ci_high'])} |")
    by_short = sorted(s["chosen"], key=lambda o: -s["chosen"][o]["val_mean"])
    by_long = sorted(s["longer"], key=lambda o: -s["longer"][o]["val_mean"])
    vals = [c["val_mean"] for c in s["longer"].values()]
    spread = max(vals) - min(vals)
    mdds = [p["mdd"] for p in s["pairs"] if not math.isnan(p["mdd"])]
    up = all(s["longer"][o]["val_mean"] > s["chosen"][o]["val_mean"] for o in s["longer"])
    out.append(f"\nRanking by mean val acc: {' > '.join(by_short)} at the study's budget, {' > '.join(by_long)} at the "
               f"longer one ({'unchanged' if by_short == by_long else 'changed'}). The longer budget's means lie within "
               f"{spread * 100:.2f} pp of each other on {min(c['finished'] for c in s['longer'].values())} seeds"
               + (f", under the smallest minimum detectable difference of the confirmation comparisons "
                  f"({min(mdds) * 100:.2f} pp): no winner is resolved at either budget" if mdds and spread < min(mdds) else "")
               + ("; more epochs raise every chosen config's val acc." if up else "."))
    return out


def sweep_figure(summary: dict):
    """One panel per optimizer: mean val acc ± 95 % CI against lr (momentum on the effective-lr axis η / (1 − β)),
    a line per batch size, zoomed on the decision region; collapsed and failed configs marked on the floor.
    Last panel: val/acc per epoch of each chosen config on its reported seeds, mean and 95 % CI band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy import stats

    configs = summary["configs"]
    opts = sorted({c["optimizer"] for c in configs})
    colors = {32: "tab:blue", 128: "tab:orange", 512: "tab:green"}
    ocolors = {"sgd": "tab:blue", "momentum": "tab:orange", "rmsprop": "tab:green", "adam": "tab:red"}
    fig, axes = plt.subplots(1, len(opts) + 1, figsize=(4.6 * (len(opts) + 1), 4.6), squeeze=False)
    axes = axes[0]
    good = [c["val_mean"] for c in configs if c["finished"] and not c["collapsed"] and not math.isnan(c["val_mean"])]
    top = max(good, default=1.0)
    low, high = top - 0.04, min(1.0, top + 0.006)
    for ax, opt in zip(axes, opts):
        for bs in sorted({c["batch_size"] for c in configs if c["optimizer"] == opt}):
            cs = sorted((c for c in configs if c["optimizer"] == opt and c["batch_size"] == bs and c["lr"]),
                        key=lambda c: c["lr"])
            scale = _lr_scale(cs)
            ok = [c for c in cs if c["finished"] and not c["collapsed"] and not c["failed"]]
            color = colors.get(bs)
            if ok:
                y = np.array([c["val_mean"] for c in ok])
                shown = [c["val_mean"] >= low and not math.isnan(c["val_ci_low"]) for c in ok]  # ▼ points: no bar
                err = np.array([[c["val_mean"] - c["val_ci_low"] if v else 0 for c, v in zip(ok, shown)],
                                [c["val_ci_high"] - c["val_mean"] if v else 0 for c, v in zip(ok, shown)]])
                ax.errorbar([c["lr"] * scale for c in ok], np.clip(y, low, high), yerr=err, fmt="-o", color=color,
                            capsize=3, label=f"bs {bs}", ms=4)
            bad = [c for c in cs if c["collapsed"] or c["failed"]]
            if bad:
                ax.plot([c["lr"] * scale for c in bad], [low + 0.002] * len(bad), "x", color=color, ms=9, mew=2)
            below = [c for c in ok if c["val_mean"] < low]
            if below:
                ax.plot([c["lr"] * scale for c in below], [low + 0.002] * len(below), "v", color=color, ms=7)
        c = summary["chosen"].get(opt)
        if c:
            ax.plot([c["lr"] * _lr_scale([c])], [min(max(c["val_mean"], low), high)], "*", color="gold", ms=16, mec="black",
                    zorder=5)
        ax.set_xscale("log")
        ax.set_ylim(low, high)
        ax.set_xlabel("effective lr η / (1 − β)" if opt == "momentum" else "learning rate")
        ax.set_title(f"{opt}: val acc (mean ± 95 % CI)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower center")
    axes[0].set_ylabel("val/acc_best; ★ chosen, x collapsed/failed, ▼ below the axis")
    ax2 = axes[-1]
    for opt, r in summary["reported"].items():
        curves = [t["curves"]["val/acc"] for t in r["trials"] if _ok(t) and t.get("curves", {}).get("val/acc")]
        if not curves:
            continue
        n = min(len(h) for h in curves)
        arr = np.array([h[:n] for h in curves])
        epochs = np.arange(1, n + 1)
        mean = arr.mean(0)
        ax2.plot(epochs, mean, "-o", color=ocolors.get(opt), ms=4, label=f"{r['config']} ({len(curves)} seeds)")
        if len(curves) > 1:
            half = stats.t.ppf(0.975, len(curves) - 1) * arr.std(0, ddof=1) / math.sqrt(len(curves))
            ax2.fill_between(epochs, mean - half, mean + half, color=ocolors.get(opt), alpha=0.2)
        ax2.set_xticks(epochs)
    ax2.axhline(TARGET_ACC, color="grey", lw=0.8, ls="--")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("val accuracy (mean; band: 95 % CI over seeds)")
    ax2.set_ylim(max(0.9, low - 0.02), high)
    ax2.grid(alpha=0.3)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=7)
    ax2.set_title("chosen configs on their reported seeds", fontsize=10)
    fig.tight_layout()
    return fig


def _attach_curves(client, summary: dict) -> None:
    """Per-epoch val/acc and train/loss of the reported configs' trials, for the speed and loss findings and the plot."""
    for c in list(summary["reported"].values()) + list(summary["longer"].values()):
        for t in c["trials"]:
            if _ok(t):
                t["curves"] = {k: [m.value for m in sorted(client.get_metric_history(t["run_id"], k), key=lambda m: m.step)]
                               for k in ("val/acc", "train/loss")}


def write_sweep_report(client, parent_run_id: str, out_dirs: list[Path]) -> dict:
    """Write the report files to each of `out_dirs` and to the parent run; returns the summary."""
    import matplotlib.pyplot as plt

    summary = summarize(trial_rows(client, parent_run_id))
    summary["parent_run_id"] = parent_run_id
    _attach_curves(client, summary)
    texts = {
        "sweep.csv": _csv_text(summary["rows"], TRIAL_COLUMNS),
        "study.csv": _csv_text(summary["configs"], CONFIG_COLUMNS),
        "study.json": json.dumps(metrics_json(summary), indent=2) + "\n",
        "study.md": findings_markdown(summary),
    }
    fig = sweep_figure(summary)
    for d in out_dirs:
        d.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            write_atomic(d / name, text)
        fig.savefig(d / ".sweep.png.tmp.png", dpi=110)
        (d / ".sweep.png.tmp.png").replace(d / "sweep.png")
    for name, text in texts.items():
        client.log_text(parent_run_id, text, name)
    client.log_figure(parent_run_id, fig, "sweep.png")
    plt.close(fig)
    best = summary["best"]
    if best is not None:
        summary["best_run_id"] = best_run(summary)["run_id"]
        client.log_metric(parent_run_id, "best/val_acc_mean", best["val_mean"])
        client.log_metric(parent_run_id, "best/test_acc_mean", summary["reported"][best["optimizer"]]["test_mean"])
        client.set_tag(parent_run_id, "mnistlab.best_config",
                       f"{best['config']} (selected on mean val/acc_best over {best['finished']} seed(s))")
        client.set_tag(parent_run_id, "mnistlab.best_run", summary["best_run_id"])
    client.log_metric(parent_run_id, "trials_failed", summary["failed"])
    client.log_metric(parent_run_id, "trials_reused", summary["reused"])
    return summary


def quote_into_readme(readme: Path, tag: str, text: str) -> bool:
    """Replace what sits between `<!-- tag:begin -->` and `<!-- tag:end -->` in `readme` with `text` (generated
    results stay generated); True when the file changed."""
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    old = readme.read_text()
    if begin not in old or end not in old:
        raise SystemExit(f"error: {readme} lacks the markers {begin} ... {end}; add them where the text belongs.")
    head, rest = old.split(begin, 1)
    new = f"{head}{begin}\n{text.rstrip()}\n{end}{rest.split(end, 1)[1]}"
    if new != old:
        write_atomic(readme, new)
    return new != old


def _findings_for_readme(findings: str) -> str:
    """study.md as a README section: its title dropped, its headings one level down."""
    lines = findings.splitlines()[1:]
    return "\n".join("#" + line if line.startswith("## ") else line for line in lines).strip() + "\n"


def main(argv: list[str] | None = None) -> None:
    from mlflow import MlflowClient

    ap = argparse.ArgumentParser(description="Rebuild a sweep's report (sweep.csv, study.*, sweep.png) from MLflow.")
    ap.add_argument("--parent", help="parent run id of the sweep (default: the latest sweep)")
    ap.add_argument("--experiment", default=None, help="default: logger.experiment_name in conf/")
    ap.add_argument("--out", default="reports", type=Path)
    ap.add_argument("--tracking-uri", default=None, help="default: the store conf/ defines")
    ap.add_argument("--quote-into", type=Path, metavar="README",
                    help="only quote <out>/study.md into README between its study-findings markers (no MLflow)")
    args = ap.parse_args(argv)
    if args.quote_into:
        changed = quote_into_readme(args.quote_into, "study-findings", _findings_for_readme((args.out / "study.md").read_text()))
        print(f"{args.quote_into}: {'updated' if changed else 'already up to date'} from {args.out / 'study.md'}")
        return
    uri, experiment, _ = project_store()
    args.experiment = args.experiment or experiment
    client = MlflowClient(args.tracking_uri or uri)
    parent = args.parent
    if parent is None:
        exp = client.get_experiment_by_name(args.experiment)
        found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = 'true'",
                                   order_by=["attributes.start_time DESC"], max_results=1) if exp else []
        if not found:
            raise SystemExit(f"error: no sweep found in MLflow experiment {args.experiment!r}; run one with `make sweep`.")
        parent = found[0].info.run_id
        if found[0].data.tags.get(STAGE_TAG):  # a stage of a study: the study's report, all stages
            parent = found[0].data.tags[PARENT_TAG]
    summary = write_sweep_report(client, parent, [args.out])
    print(json.dumps(metrics_json(summary), indent=2))


if __name__ == "__main__":
    main()
