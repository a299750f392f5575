"""The README's shell commands, run as written in a fresh clone, so the README cannot drift from the project.

Every line of a ```bash block is a command (a trailing `\\` continues it); a trailing `[long]`, `[cluster]` or
`[server]` in its comment marks one this test skips, with that reason. Once the README's `source
.venv/bin/activate` line has appeared, later commands run after it in their own fresh shell, as a user's would.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, PROJECT_ROOT, SHARED_MNIST

SKIP_MARKERS = {
    "long": "takes minutes (the full suite, the 108-trial study)",
    "cluster": "needs a SLURM cluster",
    "server": "starts a server and blocks until stopped",
    "gpu": "needs GPUs (none here; the preset's Trainer is built in test_readme_claims.py)",
}
ACTIVATE = "source .venv/bin/activate"
_MARKER = re.compile(r"\[([a-z-]+)\]\s*$")
_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\s*\n(.*?)^```", re.S | re.M)


def readme_commands(text: str) -> list[tuple[str, str | None]]:
    """(command, skip reason or None) for every command of the README's shell blocks, in order."""
    out = []
    for block in _BLOCK.findall(text):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            marker = _MARKER.search(line.split("#", 1)[1]) if "#" in line else None
            if marker and marker.group(1) not in SKIP_MARKERS:
                raise ValueError(f"README command {line!r}: unknown marker [{marker.group(1)}]; "
                                 f"known: {', '.join(SKIP_MARKERS)}")
            out.append((line, SKIP_MARKERS[marker.group(1)] if marker else None))
    return out


def test_readme_commands_parse_and_every_skip_has_a_reason():
    cmds = readme_commands((PROJECT_ROOT / "README.md").read_text())
    runnable = [c for c, why in cmds if why is None]
    assert runnable[:1] == ["make repro    # creates .venv if missing, installs, runs the pipeline: import MNIST -> "
                            "preprocess -> train"], runnable[:1]
    assert ACTIVATE in runnable, "the README must say how the venv gets on PATH"
    assert any(c.startswith("dvc repro") for c in runnable) and any("mnistlab.train" in c for c in runnable)
    for cmd, why in cmds:
        if why:
            print(f"skipped: {cmd}  -- {why}")


def _fresh_clone_venv(proj: Path) -> None:
    """The clone's .venv: this venv's folders linked in, with the install stamp current, so `make` reuses it
    instead of installing again (the install itself is what `make setup` and the packaging test cover)."""
    venv = BIN.parent
    (proj / ".venv").mkdir()
    for entry in venv.iterdir():
        if not entry.name.startswith(".installed-"):
            (proj / ".venv" / entry.name).symlink_to(entry)
    # the Makefile's stamp name for the clone's pyproject.toml (not this venv's, which may be stale): a reinstall
    # here would point this venv's editable install at the temporary clone
    digest = hashlib.sha256((proj / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (proj / ".venv" / f".installed-{digest}").touch()


def _user_env(**extra: str) -> dict[str, str]:
    """A new shell's environment: no venv on PATH, no tracking URI; 1 torch thread (shared CI cores)."""
    drop = ("VIRTUAL_ENV", "MLFLOW_TRACKING_URI", "MNISTLAB_PARENT_RUN_ID", "MNISTLAB_ROOT", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != BIN)
    env.update({"OMP_NUM_THREADS": "1", **extra})
    return env


def _assert_quiet_and_tree_as_the_readme_says(proj: Path, output: str) -> None:
    """No warning of ours in the output (pip's notes on this machine's index config are not ours); git shows
    data.dvc (the import's hashes) and at most the results DVC records; runs are not git-dirty."""
    from mnistlab.run_info import git_tags

    warnings = [line for line in output.splitlines()
                if re.search(r"warn|deprecat", line, re.I) and "Location '" not in line]
    assert not warnings, "\n".join(warnings)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=proj, capture_output=True, text=True).stdout
    changed = {line[3:] for line in status.splitlines()}
    assert "data.dvc" in changed and changed <= {"data.dvc", "dvc.lock", "reports/metrics.json",
                                                 "reports/curves.csv"}, status
    assert git_tags(proj)["mnistlab.git_dirty"] == "false"


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not (SHARED_MNIST / "mnist.npz").is_file(), reason=f"real MNIST mirror not at {SHARED_MNIST}")
def test_every_readme_command_runs_as_written_in_a_fresh_clone(project_copy):
    proj = project_copy
    _fresh_clone_venv(proj)
    (proj.parent / "shared").mkdir()
    (proj.parent / "shared" / "mnist").symlink_to(SHARED_MNIST)  # the README's ../shared/mnist
    # `make repro` without MNIST_DIR would fetch the public URL; CI has no route there, so the mirror stands in.
    env = _user_env(MNIST_DIR=str(SHARED_MNIST))
    activated = False
    ran, skipped = [], []
    for cmd, why in readme_commands((proj / "README.md").read_text()):
        if why:
            skipped.append(f"{cmd}  -- {why}")
            continue
        script = f"{ACTIVATE} && {cmd}" if activated and cmd != ACTIVATE else cmd
        proc = subprocess.run(["bash", "-c", script], cwd=proj, env=env, capture_output=True, text=True,
                              timeout=1800, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, (
            f"README command failed (exit {proc.returncode}): {cmd}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-4000:]}")
        if not ran:  # the first `make repro` of a fresh clone
            _assert_quiet_and_tree_as_the_readme_says(proj, proc.stdout + proc.stderr)
        ran.append(cmd)
        activated = activated or cmd == ACTIVATE
    print("ran:", *ran, "skipped:", *skipped, sep="\n  ")
    assert activated and len(ran) >= 10


def test_the_readmes_study_findings_are_the_committed_reports_study_md():
    """The README quotes reports/study.md (make sweep: mnistlab-report --quote-into), never a hand-edited copy."""
    from mnistlab.report import _findings_for_readme

    readme = (PROJECT_ROOT / "README.md").read_text()
    block = readme.split("<!-- study-findings:begin -->\n", 1)[1].split("<!-- study-findings:end -->", 1)[0]
    assert block.strip() == _findings_for_readme((PROJECT_ROOT / "reports" / "study.md").read_text()).strip()
