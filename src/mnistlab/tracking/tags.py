"""MLflow tag names shared by the run lifecycle, the sweep callback and the report (no heavy imports)."""

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: nests a trial under its sweep in the UI
SWEEP_TAG = "mnistlab.sweep"  # "true" on a sweep's parent run
ERROR_TAG = "mnistlab.error"
NOTE_TAG = "mlflow.note.content"
PID_TAG = "mnistlab.pid"
HOST_TAG = "mnistlab.host"
PROC_START_TAG = "mnistlab.proc_start"
CONFIG_HASH_TAG = "mnistlab.config_hash"  # what changes a trial's result (tracking/resume.py)
REUSED_TAG = "mnistlab.reused_from"  # on a sweep child that stands in for an earlier FINISHED run of the same hash
SWEEP_DIR_TAG = "mnistlab.sweep_dir"  # on a parent run: the absolute sweep dir its trials must share
CHECKPOINT_TAG = "mnistlab.tested_checkpoint"  # the file holding the weights a run's test scored (registry.py)
STUDY_TAG = "mnistlab.study"  # "true" on a study's parent run (study.py); its children are stage sweeps
STAGE_TAG = "mnistlab.stage"  # on a stage sweep: explore, refine, confirm or longer
# how mnistlab-study hands its run and the stage to a stage's multirun (the sweep callback nests under it)
STUDY_RUN_ENV = "MNISTLAB_STUDY_RUN_ID"
STUDY_STAGE_ENV = "MNISTLAB_STUDY_STAGE"
