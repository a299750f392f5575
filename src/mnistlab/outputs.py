"""A trial's files on disk: where they go (OutputDirs) and what they hold (metrics.json, timing.json, curves.csv)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from mnistlab.metrics import CURVE_KEYS, TIMING_KEYS
from mnistlab.paths import resolve, unique_stamp

METRICS_FILE = "metrics.json"
TIMING_FILE = "timing.json"
CURVES_FILE = "curves.csv"


@dataclass(frozen=True)
class OutputDirs:
    """A trial's folders: Lightning's root (`out`), the result files (`reports`), the checkpoints."""

    out: Path
    reports: Path
    checkpoints: Path


def output_dirs(paths_cfg: DictConfig, root: Path, hc) -> OutputDirs:
    """The configured folders, else Hydra's run dir (or a fresh logs/runs/<stamp> outside Hydra) for all three."""
    if paths_cfg.output_dir:
        out = resolve(paths_cfg.output_dir, root)
    elif hc is not None:
        out = Path(hc.runtime.output_dir)
    else:
        out = root / "logs" / "runs" / unique_stamp()
    reports = resolve(paths_cfg.reports_dir, root) if paths_cfg.reports_dir else out
    ckpts = resolve(paths_cfg.checkpoint_dir, root) if paths_cfg.checkpoint_dir else out / "checkpoints"
    return OutputDirs(out, reports, ckpts)


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a reader (DVC, a parallel trial) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def write_summary(folder: Path, metrics: dict[str, float]) -> None:
    """metrics.json (results: what DVC tracks) and timing.json (seconds, git-ignored) from one summary dict."""
    write_atomic(folder / METRICS_FILE, json.dumps({k: v for k, v in metrics.items() if k not in TIMING_KEYS}, indent=2) + "\n")
    write_atomic(folder / TIMING_FILE, json.dumps({k: v for k, v in metrics.items() if k in TIMING_KEYS}, indent=2) + "\n")


def write_curves_csv(path: Path, rows: list[dict[str, float]]) -> None:
    """curves.csv: one row per epoch, the per-epoch curves (CURVE_KEYS) to 6 decimals, NaN where one is missing."""
    lines = [",".join(["epoch", *CURVE_KEYS])]
    lines += [",".join([str(r["epoch"]), *(f"{r.get(k, float('nan')):.6f}" for k in CURVE_KEYS)]) for r in rows]
    write_atomic(path, "\n".join(lines) + "\n")
