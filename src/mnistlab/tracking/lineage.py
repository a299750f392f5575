"""Where a run's data came from, as MLflow dataset inputs: MNIST's train/val/test splits, identified by the
content checksum preprocess computed (meta.json) and sourced at the DVC import's URL, so a run page's
"Datasets used" says which data trained it and two runs on the same data share one dataset."""

from __future__ import annotations

import json
from pathlib import Path

SPLITS = ("train", "val", "test")
IMPORT_FILE = "data.dvc"


def dvc_import_source(root: Path) -> str:
    """The URL `data.dvc` imports from (the `mnist-source` remote resolved, e.g. a local mirror), else its path."""
    import yaml

    try:
        dep = yaml.safe_load((root / IMPORT_FILE).read_text())["deps"][0]["path"]
    except (OSError, KeyError, IndexError, TypeError):
        return ""
    if dep.startswith("remote://"):
        remote, _, rel = dep.removeprefix("remote://").partition("/")
        try:
            from dvc.config import Config

            url = Config(dvc_dir=str(root / ".dvc"))["remote"][remote]["url"]  # config.local included
            return f"{url.rstrip('/')}/{rel}"
        except Exception:  # no DVC repo here (an exported copy): the import path still names the source
            return dep
    return dep


def dataset_inputs(meta: dict, source_uri: str) -> list:
    """One MLflow DatasetInput per split: name mnist-<split>, digest = data checksum, context tag = split."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    # The two kinds of source the import has (the public URL, a local mirror), named directly: MLflow's
    # resolve_dataset_source() warns that a local path matches two registered source classes.
    if source_uri.startswith(("http://", "https://")):
        source = HTTPDatasetSource(source_uri)
        source_type, source_json = "http", source.to_json()  # HTTPDatasetSource's type name
    else:
        source_type, source_json = "local", json.dumps({"uri": source_uri})
    counts = meta.get("counts", {})
    return [
        DatasetInput(
            Dataset(name=f"mnist-{split}", digest=str(meta.get("data_checksum", "unknown"))[:36],
                    source_type=source_type, source=source_json,
                    profile=json.dumps({"num_rows": counts.get(split), "verified": meta.get("verified")})),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, split)],
        )
        for split in SPLITS
    ]
