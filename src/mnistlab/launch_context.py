"""The one seam through which a launch changes what a trial computes: a launcher that already trained the trial
elsewhere (launcher=stacked) installs, around the trial's job, the fit that replaces the trial's own. The trial reads
it here and imports nothing of that launcher; the recorded config, and so its hash, stays the trial's."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

# (cfg, trainer, model, datamodule, history, checkpoint dir) -> (metrics.json's summary, the per-epoch rows)
Fit = Callable[[Any, Any, Any, Any, Any, Path], tuple[dict, list[dict]]]
_installed: list[Fit] = []


@contextmanager
def fitted_elsewhere(fit: Fit) -> Iterator[None]:
    """Inside this block, a trial run in this process calls `fit` where it would train."""
    _installed.append(fit)
    try:
        yield
    finally:
        _installed.pop()


def installed_fit() -> Fit | None:
    return _installed[-1] if _installed else None
