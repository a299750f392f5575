"""Stacked trials (issue 11): a group of a sweep's trials trained as one model, each trial still its own run.

How it fits the sweep machinery (the launcher is hydra_plugins.mnistlab_launchers.launchers.StackedLauncher):
  1. The launcher composes every job's config as Hydra's BasicLauncher does (load_sweep_config, hydra.job.num),
     groups the stackable ones with equal data/model/trainer/callbacks (fit.stack_problem, fit.group_key; at most
     hydra.launcher.max_members, and what memory allows), and trains each group in ONE Lightning fit
     (fit.train_group: nets.StackedMLP + nets.StackedOptimizer, manual optimization). Each member's curves,
     per-step losses, error (a non-finite loss: that member FAILED and frozen, the others go on), best and last
     weights go to a result file in its own job dir.
  2. Then, per member, Hydra's own run_job with the normal task function (mnistlab.train.hydra_main): the job dir,
     .hydra/{config,hydra,overrides}.yaml, the job log, the sweep callback's on_job_start/on_job_end (parent link,
     trial status file, report) and the JobReturn (val/acc_best) are Hydra's and mnistlab's ordinary ones. The
     launcher installs the member's adopt.AdoptedFit around its job (mnistlab.launch_context; not an override, so the
     recorded config and its hash are the ordinary run's); train() then opens the trial's MLflow run, logs its params
     and config as always, and calls that fit where it would train: the curves go through the run's Lightning
     logger at the ordinary steps, the checkpoints are written, and the test runs on the ordinary MnistMLP.
  3. Trials that cannot be stacked (adam, early stopping, dropout, ...) and groups whose fit raised run one at a
     time through the same run_job, as launcher=basic would; the log says which and why.
"""
