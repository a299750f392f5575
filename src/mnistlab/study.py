"""`mnistlab-study`: the optimizer study as a staged protocol under one MLflow parent run.

  explore  the grid of conf's `study` block (sweep=optimizers), seeds first_seed..
  refine   where an (optimizer, batch size)'s best mean-val lr sits at the edge of the lrs tried, the next
           half-decade lr outward, round after round until bracketed (a worse or diverged neighbour on both
           sides), at most study.refine_rounds rounds
  confirm  each optimizer's config chosen on validation (explore + refine) re-trained on study.confirm_seeds fresh
           seeds; test accuracy is reported from these alone
  longer   the chosen configs at study.longer_epochs epochs on 3 confirmation seeds: does the choice hold?
Each stage is a Hydra multirun of sweep=optimizers (a stage sweep nested under the study run, tagged with its
stage); trials whose config hash already FINISHED are reused, so a re-run trains only what is missing.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import OmegaConf

from mnistlab.exits import EXIT_SIGINT, EXIT_SIGTERM
from mnistlab.paths import CONF_DIR, resolve, root_of
from mnistlab.report import (
    CONFIRM,
    EXPLORE,
    LONGER,
    REFINE,
    bracket,
    choose,
    config_rows,
    metrics_json,
    selection_trials,
    trial_rows,
    write_sweep_report,
)
from mnistlab.run_info import environment_tags, git_tags
from mnistlab.tracking.registry import register_champion, test_examples
from mnistlab.tracking.status import end_run
from mnistlab.tracking.store import open_store
from mnistlab.tracking.tags import (
    STUDY_RUN_ENV,
    STUDY_STAGE_ENV,
    STUDY_TAG,
    SWEEP_TAG,
)

LR_BOUNDS = (1e-5, 10.0)  # refine never proposes outside these
LONGER_SEEDS = 3


def half_decade(lr: float, steps: int) -> float:
    """The lr `steps` half-decades from `lr` on the grid 10^(k/2), to 3 significant digits (0.0316, 0.316, 3.16)."""
    k = round(2 * math.log10(lr)) + steps
    return float(f"{10 ** (k / 2):.3g}")


def refine_proposals(configs: list[dict]) -> dict[tuple[str, int], float]:
    """(optimizer, batch size) -> the next lr outward, for each group whose best lr has no neighbour on a side."""
    out = {}
    for opt, bs in sorted({(c["optimizer"], c["batch_size"]) for c in configs}):
        b = bracket(configs, opt, bs)
        if b is None or b["bracketed"]:
            continue
        lr = half_decade(b["best"]["lr"], 1 if b["above"] is None else -1)
        if LR_BOUNDS[0] <= lr <= LR_BOUNDS[1]:
            out[(opt, bs)] = lr
    return out


def _list(xs) -> str:
    return "[" + ",".join(str(x) for x in xs) + "]"


class Study:
    """The study run and its stages: one subprocess multirun per stage group, run in order."""

    def __init__(self, study: dict, extra: list[str]):
        self.study = study
        sweep_dirs = [t.split("=", 1)[1] for t in extra if t.startswith("hydra.sweep.dir=")]
        self.sweep_dir = sweep_dirs[-1] if sweep_dirs else None
        self.passed = [t for t in extra if not t.startswith("hydra.sweep.dir=")]
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            self.cfg = compose("config", overrides=[t for t in self.passed if not t.lstrip("+~").startswith("hydra")])
        self.root = root_of(self.cfg.paths.root)
        self.client = self.run_id = self.child = None
        self.stages = 0
        self.stopped_by = EXIT_SIGINT

    def open(self) -> None:
        cfg = self.cfg.logger
        uri, exp_id = open_store(self.cfg.paths.mlruns_dir, cfg.tracking_uri, cfg.experiment_name, self.root)
        self.client = MlflowClient(uri)
        name = f"study {time.strftime('%Y-%m-%d %H:%M:%S')}"
        tags = {SWEEP_TAG: "true", STUDY_TAG: "true", "mnistlab.study_block": str(self.study),
                **git_tags(self.root), **environment_tags()}
        self.run_id = self.client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        print(f"study: MLflow parent run {self.run_id} ({name})", flush=True)

    def stage(self, stage: str, **study) -> int:
        """One multirun of sweep=optimizers with the study block overridden by `study`; its exit code."""
        overrides = [f"study.{k}={_list(v) if isinstance(v, list) else v}" for k, v in study.items()]
        self.stages += 1
        if self.sweep_dir:  # a user-given sweep dir: one subdir per stage sweep
            overrides.append(f"hydra.sweep.dir={self.sweep_dir}/{self.stages:02d}-{stage}")
        cmd = [sys.executable, "-m", "mnistlab.train", "sweep=optimizers", *self.passed, *overrides]
        print(f"study: stage {stage}: {' '.join(overrides)}", flush=True)
        env = {**os.environ, STUDY_RUN_ENV: self.run_id, STUDY_STAGE_ENV: stage}
        self.child = subprocess.Popen(cmd, env=env)
        try:
            return self.child.wait()
        finally:
            self.child.wait()
            self.child = None

    def trials(self) -> list[dict]:
        return trial_rows(self.client, self.run_id)

    def run(self) -> int:
        s = self.study
        rc = self.stage(EXPLORE, **{k: s[k] for k in ("optimizers", "lrs", "batch_sizes", "seeds", "first_seed",
                                                     "max_epochs")})
        if rc:
            return rc
        for _ in range(int(s["refine_rounds"])):
            proposals = refine_proposals(config_rows(selection_trials(self.trials())))
            for (opt, bs), lr in proposals.items():
                rc = self.stage(REFINE, optimizers=[opt], lrs=[lr], batch_sizes=[bs], seeds=s["seeds"],
                                first_seed=s["first_seed"], max_epochs=s["max_epochs"])
                if rc:
                    return rc
            if not proposals:
                break
        configs = config_rows(selection_trials(self.trials()))
        chosen = [c for c in (choose([c for c in configs if c["optimizer"] == o]) for o in s["optimizers"]) if c]
        for extra_stage, seeds, epochs in ((CONFIRM, s["confirm_seeds"], s["max_epochs"]),
                                           (LONGER, min(LONGER_SEEDS, s["confirm_seeds"]) if s["longer_epochs"] else 0,
                                            s["longer_epochs"])):
            for c in chosen if int(seeds) > 0 else []:
                rc = self.stage(extra_stage, optimizers=[c["optimizer"]], lrs=[c["lr"]], batch_sizes=[c["batch_size"]],
                                seeds=seeds, first_seed=s["confirm_first_seed"], max_epochs=epochs)
                if rc:
                    return rc
        return 0

    def report(self) -> dict:
        out = resolve(self.cfg.paths.sweep_reports_dir or "reports", self.root)
        summary = write_sweep_report(self.client, self.run_id, [out])
        print(f"study: report in {out}: {metrics_json(summary)['chosen_on_val']}", flush=True)
        if summary.get("best_run_id"):
            try:
                register_champion(self.client, summary["best_run_id"], self.run_id,
                                  test_examples(resolve(self.cfg.data.processed_dir, self.root)))
            except Exception as e:  # noqa: BLE001 - the study's results stand without the registry entry
                print(f"study: could not register the chosen model of run {summary['best_run_id']}: {e}",
                      file=sys.stderr)
        return summary

    def forward(self, signum, _frame) -> None:
        """SIGTERM to the study goes to the running stage too (Ctrl-C reaches the whole process group)."""
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)
        self.stopped_by = EXIT_SIGTERM
        raise KeyboardInterrupt

    def close(self, rc: int) -> None:
        if self.run_id is None:
            return
        kids = self.client.search_runs([self.client.get_run(self.run_id).info.experiment_id],
                                       filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}'", max_results=5)
        if rc == 2 and not kids:  # refused before any stage started: leave nothing behind
            self.client.delete_run(self.run_id)
            return
        end_run(self.client, self.run_id, "FINISHED" if rc == 0 else "KILLED" if rc in (EXIT_SIGINT, EXIT_SIGTERM) else "FAILED",
                "" if rc == 0 else f"a stage exited {rc}")


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    """`--key v...` for the keys of conf's study block (what DVC renders from params.yaml); key=value tokens pass
    through as Hydra overrides (a study value never holds "=")."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").study)
    values: dict[str, list[str]] = {}
    extra: list[str] = []
    key = None
    for tok in argv:
        if "=" in tok:
            if tok.startswith("study."):  # study.k=v, as in a sweep
                k, v = tok[len("study."):].split("=", 1)
                values[k] = v.strip("[]").split(",") if v.startswith("[") else [v]
                key = None
            else:
                extra.append(tok)
        elif tok.startswith("--") and tok[2:] in defaults:
            key = tok[2:]
            values[key] = []
        elif key is None:
            raise SystemExit(f"error: mnistlab-study: unexpected argument {tok!r}; expected --<key> value... for "
                             f"a key of the study block ({', '.join(defaults)}) in conf/config.yaml")
        else:
            values[key].append(tok)
    study = dict(defaults)
    for k, v in values.items():
        if k not in defaults:
            raise SystemExit(f"error: mnistlab-study: study.{k} is not a key of the study block "
                             f"({', '.join(defaults)}) in conf/config.yaml")
        study[k] = [_scalar(x) for x in v] if isinstance(defaults[k], list) else _scalar(v[0])
    return study, extra


def _scalar(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main(argv: list[str] | None = None) -> None:
    """`mnistlab-study --seeds 3 --lrs 0.001 0.01 ... [hydra overrides]`: the study stage's command."""
    study, extra = parse_args(sys.argv[1:] if argv is None else argv)
    s = Study(study, extra)
    s.open()
    signal.signal(signal.SIGTERM, s.forward)
    rc = 1
    try:
        rc = s.run()
        if rc == 0:
            rc = 1  # until the report is written
            s.report()
            rc = 0
    except KeyboardInterrupt:
        rc = s.stopped_by
    finally:
        s.close(rc)
    if rc in (EXIT_SIGINT, EXIT_SIGTERM):
        print("study: stopped; re-run the same command to train only what is missing", file=sys.stderr)
    sys.exit(rc)


if __name__ == "__main__":
    main()
