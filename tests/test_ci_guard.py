"""CI cannot go green on skipped coverage: MNISTLAB_REQUIRE_ALL=1 turns skips into failures, `.ci/run` needs the data."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

from conftest import PROJECT_ROOT, cli_env

SKIPPING_TESTS = '''
import pytest
from conftest import require_real_mnist


def test_real_data_missing():
    require_real_mnist()


@pytest.mark.skipif(True, reason="a tool is missing")
def test_marker_skip():
    pass


def test_importorskip():
    pytest.importorskip("no_such_module_mnistlab")


def test_runs():
    assert True
'''


def _pytest(folder, require_all: bool) -> subprocess.CompletedProcess:
    env = cli_env(MNISTLAB_SHARED_MNIST=str(folder / "no_mnist_here"))
    env.pop("MNISTLAB_REQUIRE_ALL", None)
    if require_all:
        env["MNISTLAB_REQUIRE_ALL"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", str(folder)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=120,
    )


def test_require_all_turns_every_skip_into_a_failure(tmp_path):
    shutil.copy(PROJECT_ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_skips.py").write_text(SKIPPING_TESTS)

    relaxed = _pytest(tmp_path, require_all=False)
    assert relaxed.returncode == 0, relaxed.stdout
    assert "3 skipped" in relaxed.stdout and "1 passed" in relaxed.stdout, relaxed.stdout

    strict = _pytest(tmp_path, require_all=True)
    assert strict.returncode == 1, strict.stdout
    assert "1 passed" in strict.stdout and "skipped" not in strict.stdout.splitlines()[-1], strict.stdout
    assert strict.stdout.count("MNISTLAB_REQUIRE_ALL=1 (CI) allows no skips") >= 3, strict.stdout
    assert "no real MNIST at" in strict.stdout and "a tool is missing" in strict.stdout, strict.stdout


def test_ci_fails_up_front_without_the_mnist_mirror(project_copy):
    """`.ci/run` in a clone with no ../shared/mnist stops before it installs or tests anything."""
    proc = subprocess.Popen(
        ["bash", ".ci/run"], cwd=project_copy, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # it went on to install/test: stop all it started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, out + err
    assert f"{project_copy.parent / 'shared' / 'mnist'} lacks: mnist.npz" in err, err
    assert not (project_copy / ".venv").exists(), "CI must fail before it installs anything"
