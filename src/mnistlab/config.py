"""Start-up validation of the composed config: every problem reported at once, before data loads or a run opens."""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
from numbers import Real
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mnistlab.checkpoints import integrity_problem, is_file_path
from mnistlab.paths import resolve, workspace_root
from mnistlab.tracking.store import DB_NAME, env_tracking_uri

MLP_TARGET = "mnistlab.nets.MLP"  # the book's net (conf/model/mlp.yaml); checkpoints from before _target_ hold it
MNIST_TRAIN_SIZE = 60000
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MAX_SEED = 2**32 - 1  # numpy's (and Lightning's seed_everything) accepted range


class ConfigError(ValueError):
    """One or more config values are out of range; the message lists each with its fix."""


def _num(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def problems(cfg: DictConfig) -> list[str]:
    """Every out-of-range value in `cfg`, one message each (empty when the config is valid)."""
    out: list[str] = []

    def check(ok: bool, key: str, rule: str) -> None:
        if not ok:
            value = OmegaConf.select(cfg, key, default="<missing>")
            out.append(f"{key}={value!r}: {rule} (set it in conf/ or override `{key}=...`)")

    opt, data, model, trainer = cfg.optimizer, cfg.data, cfg.model, cfg.trainer
    check(_num(opt.get("lr")) and opt.lr > 0, "optimizer.lr", "the learning rate must be a number > 0")
    if "momentum" in opt:
        check(_num(opt.momentum) and 0 <= opt.momentum < 1, "optimizer.momentum", "must be in [0, 1)")
    if opt.get("nesterov"):
        check(_num(opt.get("momentum")) and opt.momentum > 0, "optimizer.nesterov", "needs momentum > 0")
    if "alpha" in opt:
        check(_num(opt.alpha) and 0 <= opt.alpha < 1, "optimizer.alpha", "RMSprop's rho must be in [0, 1)")
    if "eps" in opt:
        check(_num(opt.eps) and opt.eps > 0, "optimizer.eps", "must be > 0")
    if "weight_decay" in opt:
        check(_num(opt.weight_decay) and opt.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    if opt.get("_target_") == "mnistlab.optim.KerasRMSprop":
        for key in ("momentum", "centered", "weight_decay"):
            check(not opt.get(key), f"optimizer.{key}", "optimizer=rmsprop_keras has none: set it to 0/false")

    check(_int(data.batch_size) and data.batch_size >= 1, "data.batch_size", "must be an integer >= 1")
    check(_int(data.eval_batch_size) and data.eval_batch_size >= 1, "data.eval_batch_size", "must be an integer >= 1")
    check(
        _int(data.val_size) and 1 <= data.val_size < MNIST_TRAIN_SIZE,
        "data.val_size",
        f"the validation split must hold 1..{MNIST_TRAIN_SIZE - 1} of the training images",
    )
    check(_int(data.split_seed) and 0 <= data.split_seed <= MAX_SEED, "data.split_seed", f"must be an integer in 0..{MAX_SEED}")
    check(isinstance(data.get("validation"), bool), "data.validation", "must be true or false")

    out += model_problems(model)

    check(_int(trainer.max_epochs) and trainer.max_epochs >= 1, "trainer.max_epochs", "must be an integer >= 1")
    if _int(trainer.get("min_epochs")) and _int(trainer.max_epochs) and trainer.max_epochs >= 1:
        check(trainer.min_epochs <= trainer.max_epochs, "trainer.min_epochs", "must not exceed trainer.max_epochs")
    check(
        _int(trainer.log_every_n_steps) and trainer.log_every_n_steps >= 1,
        "trainer.log_every_n_steps",
        "must be an integer >= 1",
    )
    # curves.csv, the epoch charts and val/acc_best hold one validation per epoch; a second one inside an epoch
    # would land on the same x
    interval = trainer.get("val_check_interval")
    check(interval is None or (isinstance(interval, float) and interval == 1.0), "trainer.val_check_interval",
          "mnistlab validates, checkpoints and charts once per epoch: drop it, validate less often with "
          "trainer.check_val_every_n_epoch=N, or shorten an epoch with trainer.limit_train_batches")
    check(_int(cfg.seed) and 0 <= cfg.seed <= MAX_SEED, "seed", f"must be an integer in 0..{MAX_SEED} (numpy's seed range)")
    check(cfg.num_threads is None or (_int(cfg.num_threads) and cfg.num_threads >= 1), "num_threads", "null or >= 1")
    check(cfg.test_ckpt in ("best", "last"), "test_ckpt", "must be 'best' or 'last'")
    check(isinstance(cfg.flush_denormal, bool), "flush_denormal", "must be true or false")
    check(cfg.get("compile") in COMPILE_MODES, "compile", f"must be one of {list(COMPILE_MODES)} (torch.compile's modes)")
    if data.get("validation") is False:
        for name, cb in (cfg.get("callbacks") or {}).items():
            monitor = str((cb or {}).get("monitor") or "")
            if name != "model_checkpoint" and monitor.startswith("val/"):
                out.append(
                    f"callbacks.{name} monitors {monitor}, which a run with data.validation=false never computes: "
                    f"drop it (callbacks.{name}=null) or keep the validation split (data.validation=true)"
                )
    guard = (cfg.get("callbacks") or {}).get("finite_loss")
    if guard:
        check(
            _int(guard.check_every_n_steps) and guard.check_every_n_steps >= 1,
            "callbacks.finite_loss.check_every_n_steps",
            "must be an integer >= 1",
        )
    return out


def model_problems(model: DictConfig) -> list[str]:
    """What the chosen net (model._target_) says is wrong with its config (its config_problems), else that it cannot
    be found."""
    from hydra.utils import get_object

    target = model.get("_target_", MLP_TARGET)  # a config from before models had a _target_ is the MLP's
    try:
        net = get_object(str(target))
    except Exception:  # noqa: BLE001 - any import or lookup failure means the same to the user
        return [f"model._target_={target!r}: no such net; use one of conf/model/ (model=mlp, model=cnn) or a class "
                "importable by that dotted path"]
    if not hasattr(net, "config_problems"):
        return []
    plain = OmegaConf.to_container(model, resolve=True)
    return [f"model.{key}={plain.get(key, '<missing>')!r}: {rule} (set it in conf/ or override `model.{key}=...`)"
            for key, ok, rule in net.config_problems(plain) if not ok]


# Hydra flags that take a value (the next token), so it is not read as an override
_VALUE_FLAGS = {"--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "--cfg", "-c", "--package", "-p",
                "--experimental-rerun"}


def override_problems(argv: list[str], conf: Path) -> list[str]:
    """Command-line overrides Hydra would only reject after start-up (exit 1, a stray run or sweep dir): an option a
    config group of `conf` does not have, an interval sweep the basic sweeper cannot run. Syntax errors are left
    to Hydra's own message."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    tokens, skip = [], False
    for a in argv:
        if skip or a.startswith("-"):
            skip = a in _VALUE_FLAGS
            continue
        if "=" in a:
            tokens.append(a)
    try:
        parsed = OverridesParser.create().parse_overrides(tokens)
    except Exception:  # noqa: BLE001 - Hydra reports its own syntax errors, with the position
        return []
    out = []
    other_sweeper = any(o.key_or_group == "hydra/sweeper" for o in parsed)
    for o in parsed:
        if o.is_delete():
            continue
        if o.is_sweep_override() and o.is_interval_sweep():
            if not other_sweeper:
                out.append(f"{o.input_line}: Hydra's basic sweeper (the one conf/ uses) runs lists and ranges, not "
                           "interval(...) sweeps: give the values, e.g. `optimizer.lr=0.001,0.01,0.1`")
            continue
        group = conf / o.key_or_group
        if o.package is not None or not group.is_dir():
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        options = sorted(p.stem for p in group.glob("*.yaml"))
        for v in values:
            if v != "null" and v not in options:
                out.append(f"{o.key_or_group}={v}: conf/{o.key_or_group}/ has no {v}.yaml; one of {options}")
    return out


def input_problems(cfg: DictConfig, root) -> list[str]:
    """What the config points at, checked before data loads or a run opens: the checkpoint to resume, the MLflow
    store, and that the split parameters are the ones data/processed was made with."""

    out = []
    ckpt = cfg.get("ckpt_path")
    if is_file_path(ckpt):
        out += _checkpoint_problems(resolve(ckpt, root))
    if cfg.logger.enabled:
        out += _store_problems(cfg, root)
    meta_file = resolve(cfg.data.processed_dir, root) / "meta.json"
    # missing data fails in the data module, with its own fix; without validation the split is not used
    if meta_file.is_file() and cfg.data.get("validation", True) is not False:
        import json

        meta = json.loads(meta_file.read_text())
        for key in ("val_size", "split_seed"):
            if key in meta and cfg.data.get(key) != meta[key]:
                out.append(
                    f"data.{key}={cfg.data.get(key)!r}, but {meta_file.parent} was split with data.{key}={meta[key]!r}: "
                    f"the split is made by the preprocess stage, so this override cannot take effect at train time. "
                    f"Re-run that stage with it (`dvc repro preprocess` after setting it in conf/data/, or "
                    f"`python -m mnistlab.data.preprocess data.{key}={cfg.data.get(key)}`), or drop the override"
                )
    return out


def _checkpoint_problems(path) -> list[str]:
    import zipfile

    if not path.is_file():
        return [f"ckpt_path={str(path)!r}: no such file; give the path of a Lightning checkpoint "
                f"(e.g. logs/runs/<run>/checkpoints/last.ckpt) or `ckpt_path=last`"]
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not a checkpoint
        return [f"ckpt_path={str(path)!r}: not a PyTorch/Lightning checkpoint (not a torch.save archive)"]
    damage = integrity_problem(path)
    if damage:
        return [f"ckpt_path={str(path)!r}: {damage}; resume from another checkpoint of the run (last.ckpt or "
                f"best.ckpt) or start fresh without ckpt_path"]
    try:
        import torch

        keys = set(torch.load(path, map_location="cpu", weights_only=False, mmap=True))
    except Exception as e:
        return [f"ckpt_path={str(path)!r}: unreadable checkpoint ({type(e).__name__}: {e})"]
    if not {"state_dict", "pytorch-lightning_version"} <= keys:
        return [f"ckpt_path={str(path)!r}: a torch file but not a Lightning checkpoint (no state_dict / version)"]
    return []


STORE_MIN_FREE = 32 * 2**20  # what one run writes into the store, with room to spare
RUN_MIN_FREE = 32 * 2**20  # what one run writes into its own folder (two checkpoints, plots, curves), with room


def low_disk_problem(folder: Path, key: str, need: int, what: str) -> str | None:
    """`folder`'s disk (its nearest existing parent's) has less than `need` bytes free: say so, naming `key`."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free >= need:
        return None
    return (f"{key}={str(folder)!r}: its disk has {free / 2**20:.1f} MiB free, less than a run writes there "
            f"({need / 2**20:.0f} MiB: {what}); free space there or point {key} at another disk")


def _store_problems(cfg: DictConfig, root) -> list[str]:
    """The project's SQLite store: its folder creatable and writable, its database a readable SQLite file."""
    if cfg.logger.get("tracking_uri") or env_tracking_uri():
        return []  # a server or another store: MLflow reports its own errors
    mlruns = resolve(cfg.paths.mlruns_dir, workspace_root(root))
    try:
        mlruns.mkdir(parents=True, exist_ok=True)
        probe = mlruns / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return [f"paths.mlruns_dir={str(mlruns)!r}: the MLflow store's folder is not usable ({e.strerror or e}); "
                f"point paths.mlruns_dir at a writable folder, or use logger=none"]
    short = low_disk_problem(mlruns, "paths.mlruns_dir", STORE_MIN_FREE, "checkpoint, plots, model")
    if short:
        return [short]
    db = mlruns / DB_NAME
    if db.is_file() and db.stat().st_size:
        try:  # quick_check reads the whole file (0.02 s for 50 MB here): damage inside it, not only its header
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
                verdict = con.execute("pragma quick_check(1)").fetchone()[0]
            if verdict != "ok":
                raise sqlite3.DatabaseError(verdict)
        except sqlite3.DatabaseError as e:
            return [f"{db} is corrupt, not a readable MLflow SQLite database ({e}). Move it aside to start a new "
                    f"store (`mv {db} {db}.corrupt`) or restore it from a backup; runs in it cannot be read"]
    return []


def validate_inputs(cfg: DictConfig, root) -> None:
    """Raise ConfigError listing every problem with what `cfg` points at (see input_problems)."""
    found = input_problems(cfg, root)
    if found:
        lines = "\n".join(f"  - {p}" for p in found)
        raise ConfigError(f"Invalid inputs ({len(found)} problem(s)); nothing was started:\n{lines}")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem in `cfg`."""
    found = problems(cfg)
    if found:
        lines = "\n".join(f"  - {p}" for p in found)
        raise ConfigError(f"Invalid configuration ({len(found)} problem(s)); nothing was started:\n{lines}")


def task_config(job_cfg: DictConfig) -> DictConfig:
    """A launcher's composed job config without its `hydra` node: the config the job's task gets (and hashes)."""
    return OmegaConf.masked_copy(job_cfg, [k for k in job_cfg if k != "hydra"])


def effective_test_ckpt(cfg: DictConfig) -> str:
    """Which weights the test scores: cfg.test_ckpt, but always "last" without validation (there is no best)."""
    return cfg.test_ckpt if cfg.data.validation else "last"


def with_run_overrides(argv: list[str]) -> list[str]:
    """`ckpt_path=<run dir>/checkpoints/<file>.ckpt` resumes that run as it was configured: the overrides it was
    started with (its .hydra/overrides.yaml) go first, so keys given on the command line still win. Without them
    a run started with optimizer=momentum would resume under the default optimizer and fail on its state."""
    ckpt = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("ckpt_path=")), None)
    if not ckpt or "-m" in argv or "--multirun" in argv:
        return argv
    saved = Path(ckpt).expanduser().resolve().parent.parent / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        return argv
    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")

    given = {key(a) for a in argv[1:] if "=" in a}
    inherited = [str(o) for o in OmegaConf.load(saved) if key(str(o)) not in given | {"ckpt_path"}]
    if inherited:
        print(f"resuming {saved.parent.parent} with the overrides it was started with: {' '.join(inherited)}",
              file=sys.stderr)
    return argv[:1] + inherited + argv[1:]
