"""Start-up validation of the composed config: every problem reported at once, before data loads or a run opens."""

from __future__ import annotations

from numbers import Real

from omegaconf import DictConfig, OmegaConf

ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu")
INITS = ("torch", "keras")
MNIST_TRAIN_SIZE = 60000


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
    check(_int(data.split_seed), "data.split_seed", "must be an integer")
    check(isinstance(data.get("validation"), bool), "data.validation", "must be true or false")

    hidden = model.hidden_sizes
    check(
        OmegaConf.is_list(hidden) and all(_int(h) and h >= 1 for h in hidden),
        "model.hidden_sizes",
        "must be a list of layer widths >= 1, e.g. [512]",
    )
    check(model.activation in ACTIVATIONS, "model.activation", f"must be one of {list(ACTIVATIONS)}")
    check(_num(model.dropout) and 0 <= model.dropout < 1, "model.dropout", "must be in [0, 1)")
    check(model.get("init") in INITS, "model.init", f"must be one of {list(INITS)}")

    check(_int(trainer.max_epochs) and trainer.max_epochs >= 1, "trainer.max_epochs", "must be an integer >= 1")
    if _int(trainer.get("min_epochs")) and _int(trainer.max_epochs) and trainer.max_epochs >= 1:
        check(trainer.min_epochs <= trainer.max_epochs, "trainer.min_epochs", "must not exceed trainer.max_epochs")
    check(
        _int(trainer.log_every_n_steps) and trainer.log_every_n_steps >= 1,
        "trainer.log_every_n_steps",
        "must be an integer >= 1",
    )
    check(_int(cfg.seed), "seed", "must be an integer")
    check(cfg.num_threads is None or (_int(cfg.num_threads) and cfg.num_threads >= 1), "num_threads", "null or >= 1")
    check(cfg.test_ckpt in ("best", "last"), "test_ckpt", "must be 'best' or 'last'")
    check(isinstance(cfg.flush_denormal, bool), "flush_denormal", "must be true or false")
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


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem in `cfg`."""
    found = problems(cfg)
    if found:
        lines = "\n".join(f"  - {p}" for p in found)
        raise ConfigError(f"Invalid configuration ({len(found)} problem(s)); nothing was started:\n{lines}")
