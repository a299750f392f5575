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
from mnistlab.tracking.tags import PARENT_TAG, REUSED_TAG, SWEEP_TAG

REPORTED = "test/acc"  # what is reported for the chosen configs; never used to choose
CI_LEVEL = 0.95
USABLE_MARGIN = 0.005  # an lr is "usable" when its config's mean val acc is within 0.5 pp of the optimizer's best
COLLAPSE_ACC = 0.2  # a finished seed at most twice chance (10 classes) has collapsed: it predicts one or two classes
POWER = 0.8  # for the minimum detectable difference of a paired comparison
TRIAL_COLUMNS = ["optimizer", "lr", "batch_size", "momentum", "seed", OBJECTIVE, REPORTED, "epochs",
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
    """One dict per child run of the sweep, sorted by optimizer, batch size, lr, seed."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=5000
    )
    rows = []
    for r in runs:
        p, m = r.data.params, r.data.metrics
        finished = r.info.status == "FINISHED"
        rows.append({
            "optimizer": p.get("optimizer", ""),
            "lr": _num(p.get("lr")),
            "batch_size": _num(p.get("batch_size"), int),
            "momentum": _num(p.get("momentum")),
            "seed": _num(p.get("seed"), int),
            OBJECTIVE: m.get(OBJECTIVE) if finished else None,
            "test/acc": m.get(REPORTED) if finished else None,
            "epochs": _num(m.get("epochs"), int),
            "fit_seconds": m.get("fit_seconds"),
            "status": r.info.status,
            "reused": r.data.tags.get(REUSED_TAG, ""),
            "run_id": r.info.run_id,
        })
    rows.sort(key=lambda d: (d["optimizer"], d["batch_size"] or 0, d["lr"] or 0, d["seed"] or 0))
    return rows


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


def summarize(trials: list[dict]) -> dict:
    """Counts, per-config statistics, the chosen config overall and per optimizer, paired differences."""
    configs = config_rows(trials)
    chosen = {o: choose([c for c in configs if c["optimizer"] == o]) for o in sorted({c["optimizer"] for c in configs})}
    chosen = {o: c for o, c in chosen.items() if c is not None}
    best = choose(configs)
    pairs = [{"a": a, "b": b, **paired_difference(chosen[a], chosen[b])} for a, b in combinations(sorted(chosen), 2)]
    holm_adjust(pairs)
    seeds = sorted({t["seed"] for t in trials if t["seed"] is not None})
    return {
        "trials": len(trials), "finished": sum(_ok(t) for t in trials), "failed": sum(not _ok(t) for t in trials),
        "reused": sum(bool(t["reused"]) for t in trials), "configs": configs, "seeds": seeds,
        "chosen": chosen, "best": best, "pairs": pairs,
    }


def best_run(config: dict) -> dict:
    """The chosen config's seed with the highest val accuracy (the model a user would deploy)."""
    return max((t for t in config["trials"] if _ok(t)), key=lambda t: t[OBJECTIVE])


def _round(x, nd=6):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, nd)


def metrics_json(summary: dict) -> dict:
    """Numbers only, for `dvc metrics show`: counts and each optimizer's chosen config (selected on validation)."""
    out = {k: summary[k] for k in ("trials", "finished", "failed")}
    out["seeds"] = len(summary["seeds"])
    out["chosen_on_val"] = {
        o: {"lr": c["lr"], "batch_size": c["batch_size"], "val_acc_mean": _round(c["val_mean"]),
            "test_acc_mean": _round(c["test_mean"]),
            "test_acc_ci95": _round((c["test_ci_high"] - c["test_ci_low"]) / 2)}
        for o, c in summary["chosen"].items()
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
        lrs = [c["lr"] for c in configs if c["optimizer"] == opt and c["batch_size"] == bs and not c["failed"]
               and c["finished"] and c["val_mean"] >= best_val - USABLE_MARGIN]
        parts.append(f"bs {bs}: " + (", ".join(f"{lr:g}" for lr in sorted(lrs)) if lrs else "none"))
    return "; ".join(parts)


def findings_markdown(summary: dict) -> str:
    """The study's findings as Markdown, written from the data (the README quotes it)."""
    s, configs = summary, summary["configs"]
    seeds = len(s["seeds"])
    lines = [
        "# Findings of the sweep", "",
        f"{s['trials']} trials ({len(configs)} configs x {seeds} seed(s)): {s['finished']} finished, "
        f"{s['failed']} failed" + (f", {s['reused']} reused from earlier sweeps" if s["reused"] else "") + ". "
        f"Each config is **chosen on validation** (mean `val/acc_best` over seeds, among configs whose every seed "
        f"finished); test accuracy is reported for it, never used to choose. Intervals are 95 % Student t over "
        f"seeds (accuracy in %).", "",
        "## Chosen config per optimizer (selected on validation)", "",
        "| optimizer | lr | batch | seeds | val acc % (mean ± CI) | test acc % (mean ± CI) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for o, c in s["chosen"].items():
        lines.append(f"| {o} | {c['lr']:g} | {c['batch_size']} | {c['finished']} | "
                     f"{_pm(c['val_mean'], c['val_ci_low'], c['val_ci_high'])} | "
                     f"{_pm(c['test_mean'], c['test_ci_low'], c['test_ci_high'])} |")
    if s["best"] is not None:
        b = s["best"]
        lines += ["", f"Overall, by mean validation accuracy: **{b['config']}** "
                      f"(val {_pm(b['val_mean'], b['val_ci_low'], b['val_ci_high'])} %, "
                      f"test {_pm(b['test_mean'], b['test_ci_low'], b['test_ci_high'])} %)."]
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
    lines += ["", f"## Usable learning rates (mean val acc within {USABLE_MARGIN * 100:g} pp of the optimizer's best, "
                  "no failed seed)", ""]
    for o, c in s["chosen"].items():
        lines.append(f"- **{o}**: {_lr_ranges(configs, o, c['val_mean'])}")
    failed = [c for c in configs if c["failed"] or c["collapsed"]]
    lines += ["", f"## Failed, diverged or collapsed configs (a finished seed at most {COLLAPSE_ACC:.0%} val acc)", ""]
    lines += [f"- {c['config']}: " + ", ".join(
        ([f"{c['failed']} of {c['n']} seed(s) failed"] if c["failed"] else [])
        + ([f"{c['collapsed']} of {c['n']} collapsed (test acc {c['test_ci_low'] * 100:.2f}-{c['test_ci_high'] * 100:.2f} %)"]
           if c["collapsed"] else [])) for c in failed] or ["- none"]
    return "\n".join(lines) + "\n"


def sweep_figure(summary: dict, client):
    """Left: test acc mean +- 95 % CI against lr per optimizer (colour) and batch size (style), the chosen
    configs starred. Right: val/acc per epoch of each optimizer's chosen config, mean and min-max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    configs = summary["configs"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"sgd": "tab:blue", "momentum": "tab:orange", "rmsprop": "tab:green", "adam": "tab:red"}
    styles = ["-o", "--s", ":^", "-.d"]
    sizes = sorted({c["batch_size"] for c in configs if c["batch_size"] is not None})
    means = [c["test_mean"] for c in configs if not math.isnan(c["test_mean"])]
    floor = max(0.0, min(means + [0.9]) - 0.03)
    for opt in sorted({c["optimizer"] for c in configs}):
        for i, bs in enumerate(sizes):
            cs = sorted((c for c in configs if c["optimizer"] == opt and c["batch_size"] == bs and c["lr"]),
                        key=lambda c: c["lr"])
            ok = [c for c in cs if c["finished"]]
            if ok:
                err = [[0 if math.isnan(c["test_ci_low"]) else c["test_mean"] - c["test_ci_low"] for c in ok],
                       [0 if math.isnan(c["test_ci_high"]) else c["test_ci_high"] - c["test_mean"] for c in ok]]
                ax.errorbar([c["lr"] for c in ok], [c["test_mean"] for c in ok], yerr=err, fmt=styles[i % len(styles)],
                            color=colors.get(opt), capsize=3, label=f"{opt} bs={bs}")
            failed = [c["lr"] for c in cs if c["failed"]]
            if failed:  # some seed diverged or crashed: drawn on the floor of the plot
                ax.plot(failed, [floor + 0.005] * len(failed), "x", color=colors.get(opt), markersize=9, mew=2)
    for opt, c in summary["chosen"].items():
        ax.plot([c["lr"]], [c["test_mean"]], "*", color=colors.get(opt), markersize=18, mec="black")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("test accuracy (mean ± 95 % CI over seeds)")
    ax.set_ylim(floor, 1.0)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("test accuracy; ★ = chosen on validation, x = a seed failed")
    for opt, c in summary["chosen"].items():
        curves = []
        for t in c["trials"]:
            if _ok(t):
                hist = sorted(client.get_metric_history(t["run_id"], "val/acc"), key=lambda m: m.step)
                curves.append([m.value for m in hist])
        if not curves:
            continue
        n = min(len(h) for h in curves)
        arr = np.array([h[:n] for h in curves])
        epochs = range(1, n + 1)
        ax2.plot(epochs, arr.mean(0), "-o", color=colors.get(opt), label=f"{c['config']} ({len(curves)} seeds)")
        ax2.fill_between(epochs, arr.min(0), arr.max(0), color=colors.get(opt), alpha=0.2)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("val accuracy (mean; band: min-max over seeds)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    ax2.set_title("val/acc of each optimizer's config chosen on validation")
    fig.tight_layout()
    return fig


def write_sweep_report(client, parent_run_id: str, out_dirs: list[Path]) -> dict:
    """Write the report files to each of `out_dirs` and to the parent run; returns the summary."""
    import matplotlib.pyplot as plt

    summary = summarize(trial_rows(client, parent_run_id))
    summary["parent_run_id"] = parent_run_id
    texts = {
        "sweep.csv": _csv_text([t for c in summary["configs"] for t in c["trials"]], TRIAL_COLUMNS),
        "study.csv": _csv_text(summary["configs"], CONFIG_COLUMNS),
        "study.json": json.dumps(metrics_json(summary), indent=2) + "\n",
        "study.md": findings_markdown(summary),
    }
    fig = sweep_figure(summary, client)
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
        summary["best_run_id"] = best_run(best)["run_id"]
        client.log_metric(parent_run_id, "best/val_acc_mean", best["val_mean"])
        client.log_metric(parent_run_id, "best/test_acc_mean", best["test_mean"])
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
    summary = write_sweep_report(client, parent, [args.out])
    print(json.dumps(metrics_json(summary), indent=2))


if __name__ == "__main__":
    main()
