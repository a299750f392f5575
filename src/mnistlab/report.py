"""The sweep summary, read back from MLflow: sweep.csv (one row per trial), sweep.png, sweep_best.json.

`mnistlab-report` rebuilds it for the latest (or a given) sweep; the sweep callback calls it at the end of
every multirun and attaches the same files to the parent run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path

from mnistlab.tracking.tags import PARENT_TAG, SWEEP_TAG

COLUMNS = ["optimizer", "lr", "batch_size", "momentum", "test/acc", "val/acc_best", "epochs", "fit_seconds",
           "status", "run_id", "run_name"]


def _num(x, cast=float):
    try:
        return cast(x)
    except (TypeError, ValueError):
        return None


def trial_rows(client, parent_run_id: str) -> list[dict]:
    """One dict per child run of the sweep, sorted by optimizer, batch size, lr."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=5000
    )
    rows = []
    for r in runs:
        p, m = r.data.params, r.data.metrics
        rows.append({
            "optimizer": p.get("optimizer", ""),
            "lr": _num(p.get("lr")),
            "batch_size": _num(p.get("batch_size"), int),
            "momentum": _num(p.get("momentum")),
            "test/acc": m.get("test/acc"),
            "val/acc_best": m.get("val/acc_best"),
            "epochs": _num(m.get("epochs"), int),
            "fit_seconds": m.get("fit_seconds"),
            "status": r.info.status,
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
        })
    rows.sort(key=lambda d: (d["optimizer"], d["batch_size"] or 0, d["lr"] or 0))
    return rows


def best_config(rows: list[dict]) -> dict:
    """Best finished trial overall and per optimizer, by test/acc."""
    ok = [r for r in rows if r["status"] == "FINISHED" and r["test/acc"] is not None and not math.isnan(r["test/acc"])]

    def pick(rs):
        b = max(rs, key=lambda r: r["test/acc"])
        return {k: b[k] for k in ("optimizer", "lr", "batch_size", "momentum", "test/acc", "val/acc_best", "run_id", "run_name")}

    out = {"trials": len(rows), "finished": len(ok), "failed": sum(r["status"] != "FINISHED" for r in rows)}
    if ok:
        out["best"] = pick(ok)
        out["per_optimizer"] = {o: pick([r for r in ok if r["optimizer"] == o]) for o in sorted({r["optimizer"] for r in ok})}
    return out


def rows_to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    return buf.getvalue()


def sweep_figure(rows: list[dict], summary: dict, client):
    """Left: test/acc vs lr, a colour per optimizer and a line style per batch size. Right: val/acc per epoch of
    each optimizer's best trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"sgd": "tab:blue", "momentum": "tab:orange", "rmsprop": "tab:green", "adam": "tab:red"}
    styles = ["-o", "--s", ":^", "-.d"]
    sizes = sorted({r["batch_size"] for r in rows if r["batch_size"] is not None})
    accs = [r["test/acc"] for r in rows if r["status"] == "FINISHED" and r["test/acc"] is not None]
    floor = max(0.0, min(accs + [0.9]) - 0.03)
    for opt in sorted({r["optimizer"] for r in rows}):
        for i, bs in enumerate(sizes):
            trials = [r for r in rows if r["optimizer"] == opt and r["batch_size"] == bs and r["lr"]]
            pts = sorted((r["lr"], r["test/acc"] if r["status"] == "FINISHED" else float("nan")) for r in trials)
            if pts:
                ax.plot(*zip(*pts), styles[i % len(styles)], color=colors.get(opt), label=f"{opt} bs={bs}")
            failed = [r["lr"] for r in trials if r["status"] != "FINISHED"]
            if failed:  # diverged or crashed: drawn on the floor of the plot
                ax.plot(failed, [floor + 0.005] * len(failed), "x", color=colors.get(opt), markersize=9, mew=2)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(floor, 1.0)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("test accuracy after training (x: trial failed, e.g. diverged)")
    for opt, best in (summary.get("per_optimizer") or {}).items():
        hist = sorted(client.get_metric_history(best["run_id"], "val/acc"), key=lambda m: m.step)
        ax2.plot(range(1, len(hist) + 1), [m.value for m in hist], "-o", color=colors.get(opt),
                 label=f"{best['run_name']} ({best['test/acc']:.4f})")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("val accuracy")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    ax2.set_title("val/acc of each optimizer's best trial")
    fig.tight_layout()
    return fig


def write_sweep_report(client, parent_run_id: str, out_dirs: list[Path]) -> dict:
    """Write sweep.csv, sweep.png and sweep_best.json to each of `out_dirs` and to the parent run."""
    import matplotlib.pyplot as plt

    rows = trial_rows(client, parent_run_id)
    summary = best_config(rows)
    summary["parent_run_id"] = parent_run_id
    text_csv, text_json = rows_to_csv(rows), json.dumps(summary, indent=2) + "\n"
    fig = sweep_figure(rows, summary, client)
    for d in out_dirs:
        d.mkdir(parents=True, exist_ok=True)
        for name, text in (("sweep.csv", text_csv), ("sweep_best.json", text_json)):
            tmp = d / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(d / name)
        fig.savefig(d / "sweep.png", dpi=110)
    client.log_text(parent_run_id, text_csv, "sweep.csv")
    client.log_text(parent_run_id, text_json, "sweep_best.json")
    client.log_figure(parent_run_id, fig, "sweep.png")
    plt.close(fig)
    if "best" in summary:
        client.log_metric(parent_run_id, "best/test_acc", summary["best"]["test/acc"])
        client.set_tag(parent_run_id, "mnistlab.best_run", summary["best"]["run_name"])
    client.log_metric(parent_run_id, "trials_failed", summary["failed"])
    return summary


def main(argv: list[str] | None = None) -> None:
    from mlflow import MlflowClient

    from mnistlab.paths import workspace_root
    from mnistlab.tracking.store import resolve_tracking_uri

    ap = argparse.ArgumentParser(description="Rebuild the sweep report (reports/sweep.*) from MLflow.")
    ap.add_argument("--parent", help="parent run id of the sweep (default: the latest sweep)")
    ap.add_argument("--experiment", default="mnistlab")
    ap.add_argument("--out", default="reports", type=Path)
    ap.add_argument("--tracking-uri", default=None)
    args = ap.parse_args(argv)
    root = workspace_root()
    client = MlflowClient(resolve_tracking_uri(args.tracking_uri, root / "mlruns"))
    parent = args.parent
    if parent is None:
        exp = client.get_experiment_by_name(args.experiment)
        found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = 'true'",
                                   order_by=["attributes.start_time DESC"], max_results=1) if exp else []
        if not found:
            raise SystemExit(f"error: no sweep found in MLflow experiment {args.experiment!r}; run one with `make sweep`.")
        parent = found[0].info.run_id
    summary = write_sweep_report(client, parent, [args.out])
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
