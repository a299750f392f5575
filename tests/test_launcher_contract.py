"""Hydra's own launcher conformance suite (hydra.test_utils.launcher_common_tests, run as Hydra's joblib and submitit
plugins run it) on every local mnistlab launcher: each honours Hydra's launcher contract for any app, not only
mnistlab's. The SLURM launcher needs a cluster: tests/test_cluster.py runs it on a real one."""

from __future__ import annotations

import os

import pytest
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite
from hydra.version import VersionBase
from packaging.version import Version

from mnistlab.threads import PARALLEL_ENV

pytestmark = pytest.mark.slow
LAUNCHERS = ["mnistlab_joblib", "mnistlab_submitit_local", "mnistlab_stacked"]


@pytest.fixture(autouse=True)
def hydras_own_test_setting():
    """The suite runs the launchers in this process, as Hydra's plugins run it: with Hydra's default version base
    (1.1: a job runs in its own dir), which composing mnistlab's config elsewhere in the session sets to 1.3 for the
    whole process; and the launchers' trials-at-once variable (set for their jobs) must not reach later tests."""
    saved, parallel = VersionBase.instance(), os.environ.get(PARALLEL_ENV)
    hydras_default = VersionBase()
    hydras_default.setbase(Version("1.1"))
    VersionBase.set_instance(hydras_default)
    yield
    VersionBase.set_instance(saved)
    os.environ.pop(PARALLEL_ENV, None)
    if parallel is not None:
        os.environ[PARALLEL_ENV] = parallel


@pytest.mark.parametrize("launcher_name, overrides", [(name, []) for name in LAUNCHERS])
class TestLaunchers(LauncherTestSuite):
    pass


@pytest.mark.parametrize(
    "task_launcher_cfg, extra_flags",
    [({}, ["-m", "hydra/job_logging=hydra_debug", "hydra/job_logging=disabled", f"hydra/launcher={name}"])
     for name in LAUNCHERS],
)
class TestLaunchersIntegration(IntegrationTestSuite):
    pass
