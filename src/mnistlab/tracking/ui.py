"""How the MLflow UI opens the project's experiment: on its training runs, with the study's columns.

MLflow 3 opens an experiment on a GenAI overview (traces, token usage) unless the experiment's kind tag says
"custom model development"; the run table's columns come from a *shared view state*, a JSON experiment tag
that a `viewStateShareKey=<key>` link loads (what the UI's own "Share" button writes). Both are set here, so
the link `make ui` prints lands on the runs with optimizer, lr, batch size, seed, val/acc_best and test/acc.
"""

from __future__ import annotations

import json

from mnistlab.metrics import OBJECTIVE

KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"
VIEW_KEY = "mnistlab"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # the UI reads the tag named prefix + the link's key
PARAM_COLUMNS = ("optimizer", "lr", "batch_size", "seed")
METRIC_COLUMNS = (OBJECTIVE, "test/acc")


def view_state() -> dict:
    """The run table the link opens: sorted by val/acc_best (the selection metric), the study's columns,
    a wide run-name column, charts against the logged step (the epoch for per-epoch metrics)."""
    columns = [f"params.`{p}`" for p in PARAM_COLUMNS] + [f"metrics.`{m}`" for m in METRIC_COLUMNS]
    return {
        "searchFilter": "",
        "orderByKey": "metrics.`val/acc_best`",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": columns + ["attributes.`Models`"],
        "columnWidths": {"tags.`mlflow.runName`": 320},
        "runsExpanded": {},
        "runsPinned": [],
        "runsHidden": [],
        "runsHiddenMode": "FIRST_10_RUNS",
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": False,
        "groupBy": None,
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }


def set_experiment_view(client, experiment_id: str) -> None:
    """Tag the experiment so the UI treats it as model training and knows the project's run-table view."""
    client.set_experiment_tag(experiment_id, KIND_TAG, KIND)
    client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + VIEW_KEY, json.dumps(view_state()))


def runs_url(base_url: str, experiment_id: str) -> str:
    """The experiment's training runs with the project's view, e.g. http://127.0.0.1:5000/#/experiments/1/runs?..."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"
