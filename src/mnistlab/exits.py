"""Exit statuses that tell a scheduler, CI or `dvc repro` the truth: 130 after Ctrl-C, 143 after SIGTERM.

Lightning turns Ctrl-C into SystemExit(1) and SIGTERM into SIGTERMException, a SystemExit whose code is
None, i.e. exit status 0; the original cause survives in the exception chain, which is what we read.
"""

from __future__ import annotations

import errno
import signal
import threading

EXIT_SIGINT = 128 + signal.SIGINT  # 130, the shell's status for a process stopped by Ctrl-C
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143
EXIT_NOT_RECORDED = 3  # trained and written locally, but the MLflow store failed during the run


def _chain(exc: BaseException | None):
    """`exc` and its causes/contexts, each once (a chain can loop)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def interrupt_exit_code(exc: BaseException | None) -> int | None:
    """130 or 143 when `exc` (or anything in its chain) is an interrupt or a SIGTERM, else None."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    for e in _chain(exc):
        if isinstance(e, SIGTERMException):
            return EXIT_SIGTERM
        if isinstance(e, KeyboardInterrupt):
            return EXIT_SIGINT
    return None


def disk_full(exc: BaseException | None) -> OSError | None:
    """The "No space left on device" error in `exc`'s chain (a checkpoint, plot or CSV write), if any."""
    return next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)), None)


def disk_full_message(e: OSError) -> str:
    where = f" writing {e.filename}" if e.filename else ""
    return (f"the disk is full ({e.strerror}{where}): the run ended FAILED and left no partial file (checkpoints "
            "and results are written whole or not at all). Free space there, or point paths.output_dir (or "
            "hydra.run.dir) at another disk, and run it again.")


def raise_on_sigterm(signum, frame) -> None:
    """SIGTERM outside a running Trainer stops the process the way Lightning does inside one.

    While a Trainer runs, Lightning's handler is installed and calls this one as the previous handler;
    then Lightning itself raises SIGTERMException at the next batch (after a clean checkpoint), so this
    one does nothing.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if signal.getsignal(signal.SIGTERM) is raise_on_sigterm:
        raise SIGTERMException()


def install_sigterm_handler() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_on_sigterm)
