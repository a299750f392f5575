"""A first run is quiet and leaves git as the README says: our packaging builds without warnings, and what
`make repro` rewrites (DVC's lock and import file, reports/, params.yaml) does not mark runs git-dirty."""

from __future__ import annotations

import subprocess
import sys

from conftest import cli_env, git

from mnistlab.run_info import git_tags


def test_package_builds_without_warnings(project_copy, tmp_path):
    """The wheel `make setup` builds from pyproject.toml: no deprecation banner from our metadata (built from a
    copy: setuptools leaves a build/ folder in the source tree)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-w", str(tmp_path / "wheel"), str(project_copy)],
        env=cli_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = [line for line in (proc.stdout + proc.stderr).splitlines()
            if "warning" in line.lower() and "Location '" not in line]  # pip's own index config, not ours
    assert not ours, "\n".join(ours)
    assert list((tmp_path / "wheel").glob("mnistlab-*.whl"))


def test_git_dirty_tracks_code_and_config_not_dvc_outputs(project_copy):
    proj = project_copy
    tags = git_tags(proj)
    assert tags["mnistlab.git_dirty"] == "false" and tags["mlflow.source.git.branch"] in ("master", "main")
    assert tags["mlflow.source.git.commit"] == git(proj, "rev-parse", "HEAD").strip()
    # what `make repro` / `dvc exp run` rewrite: results and derived config
    for rel in ("dvc.lock", "data.dvc", "reports/metrics.json", "params.yaml", "study/dvc.lock"):
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(proj / rel, "a") as f:
            f.write("# changed by a run\n")
    git(proj, "add", "-N", "study/dvc.lock")
    assert git_tags(proj)["mnistlab.git_dirty"] == "false", git(proj, "status", "--porcelain")
    for rel in ("src/mnistlab/model.py", "conf/optimizer/sgd.yaml"):
        with open(proj / rel, "a") as f:
            f.write("\n# an edit\n")
        assert git_tags(proj)["mnistlab.git_dirty"] == "true", rel
        git(proj, "checkout", "-q", "--", rel)
