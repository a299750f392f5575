"""Every metric name mnistlab records, declared once: what the model logs, metrics.json, timing.json, curves.csv, the
plots, the report, the UI's columns and the registry read these, for the single run and a stacked member alike."""

# per epoch: logged at step = epoch, one column each of curves.csv, a line of curves.png
CURVE_KEYS = ("train/loss", "train/acc", "val/loss", "val/acc")
# the best val/acc so far (the selected checkpoint's): what a sweep optimizes and the study selects by
OBJECTIVE = "val/acc_best"
TEST_KEYS = ("test/acc", "test/loss")
# the training loss every trainer.log_every_n_steps steps, at the global step
STEP_LOSS = "train/loss_step"
# seconds vary run to run: timing.json, kept out of metrics.json so DVC's lock (and git) change only when results do
TIMING_KEYS = ("fit_seconds", "samples_per_second")
# one trial's summary: metrics.json (all but TIMING_KEYS) and timing.json
SUMMARY_KEYS = (*TEST_KEYS, OBJECTIVE, "epochs", *TIMING_KEYS, "samples_seen")
