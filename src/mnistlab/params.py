"""Regenerate params.yaml: conf/ composed exactly as `dvc exp run` composes it (DVC's own function).

params.yaml is what the DVC stages read (`--config-dir . --config-name params`); conf/ stays the one
source of truth, `dvc exp run -S ...` rewrites params.yaml itself, and `make repro` calls this first.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mnistlab.paths import conf_dir, project_root

PARAMS_FILE = "params.yaml"


def compose_params(output: Path, overrides: list[str] | None = None) -> str:
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(output, str(conf_dir()), None, "config", str(output.parent), list(overrides or []))
    return output.read_text()


def main() -> None:

    out = project_root() / PARAMS_FILE
    before = out.read_text() if out.exists() else None
    after = compose_params(out, sys.argv[1:])
    print(f"{out}: {'unchanged' if before == after else 'updated'}")


if __name__ == "__main__":
    main()
