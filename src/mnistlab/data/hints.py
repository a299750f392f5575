"""After a failed `make repro`: say what to do when the failure was the MNIST download (the usual case offline)."""

from __future__ import annotations

import subprocess
import sys

from mnistlab.paths import project_root


def main() -> None:
    root = project_root()
    if (root / "data" / "raw" / "mnist.npz").is_file():
        return
    current = subprocess.run(
        [sys.executable, "-m", "dvc", "config", "remote.mnist-source.url"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    print(
        f"\nmnistlab: the MNIST import (data.dvc) could not download mnist.npz from the `mnist-source` DVC remote "
        f"({current or 'unset'}). Offline or behind a firewall, point it at a folder that holds mnist.npz "
        f"and run again: `make repro MNIST_DIR=/path/to/mnist` (this runs `dvc remote modify "
        f"--local mnist-source url /path/to/mnist`). If a previous import is in DVC's cache, `dvc checkout data.dvc` "
        f"restores data/raw/mnist.npz.",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
