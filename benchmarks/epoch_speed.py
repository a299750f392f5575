"""Seconds per training epoch of the book's MLP on real MNIST, three ways, in ONE process on the same data.

Model 784-512(relu)-10, cross-entropy, RMSprop lr 1e-3 (alpha 0.9, eps 1e-7: Keras' defaults, as in
conf/optimizer/rmsprop.yaml), torch intra-op threads = all cores (os.cpu_count()).

  (a) torchvision   the seed notebook's pipeline: torchvision.datasets.MNIST(train=True, transform=ToTensor())
                    + DataLoader(shuffle=True, num_workers=0) + flatten + a plain Python loop
                    (nn.CrossEntropyLoss, RMSprop, running loss via loss.item()); batch 64 and 128; one epoch is
                    torchvision's 60k training set, so its time is ALSO given normalized to 55k samples.
  (b) floor         forward + backward + step on batches already made as float tensors in memory (a list of
                    (x, y) slices built before timing): the least an epoch of this model can cost here.
  (c) mnistlab      mnistlab.train.train(cfg) (Lightning Trainer.fit on device-resident batches) with conf/
                    composed like the CLI: MLflow logging on (default log_every_n_steps=50), plus two variants:
                    logger=none (isolates MLflow's per-epoch cost) and MLflow + trainer.log_every_n_steps=1
                    (what per-step logging costs). An epoch here INCLUDES the validation loop (5k images) and
                    the checkpoint save that follow each training epoch. End-of-run work (test, plots, model
                    logging) is outside the epoch times (plots/log_model are turned off anyway).

Timing (issue 13: steady-state epochs of ONE run, the floor in the same run): the mnistlab fit runs --epochs + 1
epochs and a small callback (EpochTimer) stamps every epoch start. Before each stamp it runs ONE floor epoch (b) in
the same process, with the same torch threads, on the same 55k training samples, and takes that floor epoch's time
out of the gap: mnistlab epochs and floor epochs alternate, so a load change on the shared machine hits both.
The epoch time is the MEDIAN gap between consecutive epoch starts (the last epoch ends at train end), the first
epoch (and the floor epoch before it) excluded: start-up, the sanity check and the warm-up are never counted. An
epoch thus includes the validation loop (5k images) and the checkpoint saves that follow each training epoch.
The floor is also timed alone before and after the fit (as before, --epochs passes) and reported for drift; (a) is
warmed up with --warmup-batches untimed steps. fit_seconds / epochs, the number mnistlab itself reports (it includes
Trainer set-up, the sanity-check validation and the first epoch), is shown too. The load average is printed with
every result: the machine is shared, rerun when it is high.

Targets (batch 128, per epoch over 55k samples):
  c / b <= 1.25   mnistlab's median steady-state epoch (MLflow on, default callbacks, validation included)
                  over the median interleaved floor epoch
  a / c >= 6      mnistlab at least 6x faster than the notebook pipeline (a normalized to 55k samples)

Peak RSS is the process high-water mark (ru_maxrss): it only grows, so it is read after each phase and the
growth per phase is reported; "rss now" is the current resident set (psutil) after the phase.

Results: a table on stdout and benchmarks/results/epoch_speed.json (--quick: epoch_speed_quick.json).

    .venv/bin/python benchmarks/epoch_speed.py                 # full: several minutes on 2 cores
    .venv/bin/python benchmarks/epoch_speed.py --epochs 6 --skip-torchvision      # the c/b ratio only
    .venv/bin/python benchmarks/epoch_speed.py --variants c,c_nolog,c_step1       # + logger=none, per-step logging
    .venv/bin/python benchmarks/epoch_speed.py --quick         # seconds; checks the script, not a benchmark
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "data" / "processed"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
N_REF = 55000  # samples in mnistlab's training split: every per-epoch comparison is normalized to it
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TARGET_C_OVER_B = 1.25
TARGET_A_OVER_C = 6.0
QUICK_BATCHES = 20

# The book's optimizers as the project configures them (conf/optimizer/*.yaml defaults).
OPTIMIZERS = {
    "rmsprop": ("RMSprop", {"lr": 1e-3, "alpha": 0.9, "eps": 1e-7}),
    "sgd": ("SGD", {"lr": 0.01}),
    "momentum": ("SGD", {"lr": 0.01, "momentum": 0.9}),
}


# ---------------------------------------------------------------- shared helpers (sweep_speed.py imports these)

def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def check_processed(data_dir: Path) -> Path:
    data_dir = Path(data_dir).resolve()
    needed = ["meta.json"] + [f"{a}_{s}.npy" for a in "xy" for s in ("train", "val", "test")]
    missing = [n for n in needed if not (data_dir / n).is_file()]
    if missing:
        fail(
            f"no processed MNIST in {data_dir} (missing: {', '.join(missing)}).\n"
            f"  run `make repro MNIST_DIR=/path/to/mnist` first (or pass --data-dir)."
        )
    return data_dir


def load_train_arrays(data_dir: Path):
    import numpy as np

    return np.load(data_dir / "x_train.npy"), np.load(data_dir / "y_train.npy")


def build_mlp():
    from torch import nn

    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10))


def make_optimizer(name: str, params, lr: float | None = None):
    import torch

    cls, kwargs = OPTIMIZERS[name]
    kwargs = dict(kwargs, **({"lr": lr} if lr is not None else {}))
    return getattr(torch.optim, cls)(params, **kwargs)


def floor_batches(x_u8, y_u8, batch_size: int, seed: int = 0) -> list:
    """The training split as float [0, 1] tensors, shuffled once, cut into (x, y) batch slices."""
    import torch

    n = y_u8.shape[0]
    x = torch.from_numpy(x_u8).reshape(n, -1).float().div_(255.0)
    y = torch.from_numpy(y_u8).long()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    x, y = x[perm].contiguous(), y[perm].contiguous()
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def time_floor(batches: list, optimizer: str = "rmsprop", epochs: int = 1, warmup_batches: int = 50,
               max_batches: int | None = None) -> dict:
    """Forward + backward + step over pre-made batches; one timed pass over `batches` per epoch."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model, loss_fn = build_mlp(), nn.CrossEntropyLoss()
    opt = make_optimizer(optimizer, model.parameters())
    timed = batches[:max_batches] if max_batches else batches

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    for i in range(warmup_batches):
        step(*batches[i % len(batches)])
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for x, y in timed:
            step(x, y)
        times.append(time.perf_counter() - t0)
    return {"epoch_seconds": times, "samples_per_epoch": sum(int(y.shape[0]) for _, y in timed),
            "batches_per_epoch": len(timed)}


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return r / 1024 / (1024 if sys.platform == "darwin" else 1)


def rss_now_mb() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git": git_commit(),
        "loadavg_1m_at_start": warn_if_busy(),
    }


def warn_if_busy() -> float | None:
    """The 1-minute load average; a warning when something else is using the cores (timings would be noise:
    torch's OpenMP threads slow down many times over when they share 2 cores with another busy process)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    if load > 0.5:
        print(f"WARNING: load average {load:.2f} before starting: another process is using the CPU; the timings "
              f"will be unreliable. Run the benchmarks alone.", flush=True)
    return load


def write_json(payload: dict, name: str, out: Path | None) -> Path:
    path = Path(out) if out else RESULTS_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# ---------------------------------------------------------------- (a) the notebook's torchvision pipeline

def find_raw_idx(raw_dir: Path | None) -> Path | None:
    candidates = [raw_dir] if raw_dir else [
        Path(os.environ["MNISTLAB_SHARED_MNIST"]) if os.environ.get("MNISTLAB_SHARED_MNIST") else None,
        ROOT.parent / "shared" / "mnist",
        ROOT / "data" / "raw",
    ]
    for c in candidates:
        if c and all((c / s).is_file() or (c / f"{s}.gz").is_file() for s in IDX_STEMS):
            return c
    return None


def torchvision_root(raw: Path, tmp: Path) -> Path:
    """<tmp>/MNIST/raw/ with the four IDX files decompressed: torchvision's MNIST._check_exists looks for the
    decompressed names and download=False never extracts the .gz itself."""
    dest = tmp / "MNIST" / "raw"
    dest.mkdir(parents=True, exist_ok=True)
    for stem in IDX_STEMS:
        if (raw / stem).is_file():
            shutil.copyfile(raw / stem, dest / stem)
        else:
            with gzip.open(raw / f"{stem}.gz", "rb") as src, open(dest / stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return tmp


def time_torchvision(root: Path, batch_size: int, epochs: int, warmup_batches: int,
                     max_batches: int | None = None) -> dict:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    torch.manual_seed(0)
    ds = datasets.MNIST(str(root), train=True, transform=transforms.ToTensor(), download=False)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0)
    model, loss_fn = build_mlp(), nn.CrossEntropyLoss()
    opt = make_optimizer("rmsprop", model.parameters())

    def run(limit):
        running, seen = 0.0, 0
        for i, (x, y) in enumerate(loader):
            if limit is not None and i >= limit:
                break
            x = x.view(x.size(0), -1)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            running += loss.item()
            seen += y.shape[0]
        return seen

    run(warmup_batches)
    times, samples = [], 0
    for _ in range(epochs):
        t0 = time.perf_counter()
        samples = run(max_batches)
        times.append(time.perf_counter() - t0)
    return {"epoch_seconds": times, "samples_per_epoch": samples, "dataset_size": len(ds)}


# ---------------------------------------------------------------- (c) mnistlab's train()

try:
    import lightning.pytorch as _pl

    class Floor:
        """The floor (b) as a reusable epoch: its own model and optimizer, built once; every call is one timed pass
        over the batches. The global RNG is left alone (the fit around it must not see a different stream)."""

        def __init__(self, batches: list, optimizer: str = "rmsprop"):
            import torch
            from torch import nn

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.model = build_mlp()
            self.loss_fn, self.batches = nn.CrossEntropyLoss(), batches
            self.opt = make_optimizer(optimizer, self.model.parameters())

        def __call__(self) -> float:
            import torch

            t0 = time.perf_counter()
            with torch.enable_grad():
                for x, y in self.batches:
                    self.opt.zero_grad(set_to_none=True)
                    self.loss_fn(self.model(x), y).backward()
                    self.opt.step()
            return time.perf_counter() - t0

    class EpochTimer(_pl.Callback):
        """Stamps each training epoch's start and the end of training; train() builds it from the config
        (+callbacks.epoch_timer._target_=...), so each instance registers itself where the benchmark finds it.
        With EpochTimer.floor set, one floor epoch runs right before each stamp (interleaved, not counted)."""

        instances: list["EpochTimer"] = []
        floor: "Floor | None" = None

        def __init__(self):
            self.starts: list[float] = []  # after the interleaved floor epoch
            self.pauses: list[float] = []  # before it: the previous epoch ends here
            self.floor_seconds: list[float] = []
            self.samples: list[int] = []
            self.val: list[float] = []
            self.end: float | None = None
            self.end_samples = 0
            self._v0 = 0.0
            EpochTimer.instances.append(self)

        def on_train_epoch_start(self, trainer, pl_module):
            self.pauses.append(time.perf_counter())
            if EpochTimer.floor is not None:
                self.floor_seconds.append(EpochTimer.floor())
            self.samples.append(int(getattr(pl_module, "samples_seen", 0)))
            self.starts.append(time.perf_counter())

        def on_validation_start(self, trainer, pl_module):
            self._v0 = time.perf_counter()

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.val.append(time.perf_counter() - self._v0)

        def on_train_end(self, trainer, pl_module):
            self.end = time.perf_counter()
            self.end_samples = int(getattr(pl_module, "samples_seen", 0))

        def epochs(self) -> list[tuple[float, int]]:
            """(seconds, training samples) of every finished epoch: its start to the next epoch's start (before
            that one's floor epoch), the last to train end."""
            ends = self.pauses[1:] + [self.end]
            counts = self.samples + [self.end_samples]
            return [(ends[i] - self.starts[i], counts[i + 1] - counts[i]) for i in range(len(self.starts))]
except ImportError:  # pragma: no cover - lightning is a project dependency
    EpochTimer = Floor = None


def compose(overrides: list[str]):
    """conf/ composed exactly like `python -m mnistlab.train` does (as tests/conftest.py's compose)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mnistlab.paths import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def time_mnistlab(data_dir: Path, tmp: Path, name: str, extra: list[str], epochs: int, threads: int,
                  quick: bool, floor: "Floor | None" = None) -> dict:
    from mnistlab.train import train

    base = tmp / name
    overrides = [
        f"data.processed_dir={data_dir}",
        "data.batch_size=128",
        "optimizer=rmsprop",
        f"trainer.max_epochs={epochs + 1}",  # the first epoch is the warm-up and is discarded
        # the default callbacks, progress bar included (issue 13 times what a user runs)
        "logger.log_model=false",
        "logger.plots=false",
        f"paths.root={base}",
        f"paths.output_dir={base / 'out'}",
        f"paths.mlruns_dir={base / 'mlruns'}",
        f"paths.sweep_reports_dir={base / 'reports'}",
        f"num_threads={threads}",
        f"+callbacks.epoch_timer._target_={EpochTimer.__module__}.EpochTimer",
        *extra,
    ]
    if quick:
        overrides += [f"trainer.limit_train_batches={QUICK_BATCHES}", "trainer.limit_val_batches=2",
                      "trainer.limit_test_batches=1"]
    EpochTimer.instances.clear()
    EpochTimer.floor = floor
    try:
        metrics = train(compose(overrides))
    finally:
        EpochTimer.floor = None
    timer = EpochTimer.instances[-1]
    per_epoch = timer.epochs()
    timed = per_epoch[1:] or per_epoch
    return {
        "epoch_seconds": [s for s, _ in timed],
        "floor_epoch_seconds": timer.floor_seconds[1:] or timer.floor_seconds,
        "loadavg_1m_after": os.getloadavg()[0],
        "samples_per_epoch": timed[-1][1],
        "validation_seconds": timer.val[1:] or timer.val,
        "warmup_epoch_seconds": per_epoch[0][0],
        "fit_seconds": metrics["fit_seconds"],
        "epochs": metrics["epochs"],
        "fit_seconds_per_epoch": metrics["fit_seconds"] / max(1, metrics["epochs"]),
        "test_acc": metrics["test/acc"],
        "overrides": extra,
    }


# ---------------------------------------------------------------- the benchmark

def summarize(row: dict) -> dict:
    secs = row["epoch_seconds"]
    mean = statistics.median(secs)  # the median epoch: one slow epoch (a busy neighbour) does not move it
    n = row["samples_per_epoch"]
    row.update({
        "seconds_per_epoch": mean,
        "seconds_per_epoch_mean": statistics.fmean(secs),
        "seconds_per_epoch_min": min(secs),
        "samples_per_second": n / mean,
        "seconds_per_epoch_55k": mean * N_REF / n,
    })
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_BATCHES} batches per 'epoch', 1 epoch: checks the script runs")
    ap.add_argument("--epochs", type=int, default=5,
                    help="timed epochs per mnistlab run (default 5; the run has one more, the warm-up) and floor passes")
    ap.add_argument("--variants", default="c", help="mnistlab variants, comma-separated, from c (MLflow, default "
                    "callbacks), c_nolog (logger=none), c_step1 (MLflow every step); default c")
    ap.add_argument("--warmup-batches", type=int, default=50, help="untimed steps before (a) and (b) (default 50)")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help=f"processed splits (default {DEFAULT_DATA})")
    ap.add_argument("--raw-dir", type=Path, default=None,
                    help="folder with the four MNIST IDX files (.gz or not) for (a); default $MNISTLAB_SHARED_MNIST, "
                         "../shared/mnist, data/raw")
    ap.add_argument("--skip-torchvision", action="store_true", help="leave out (a)")
    ap.add_argument("--json", type=Path, default=None, help="where to write the results (default benchmarks/results/)")
    args = ap.parse_args(argv)

    data_dir = check_processed(args.data_dir)
    raw = None if args.skip_torchvision else find_raw_idx(args.raw_dir)
    if not args.skip_torchvision and raw is None:
        fail("(a) needs the raw MNIST IDX files (train-images-idx3-ubyte[.gz] ...): pass --raw-dir DIR "
             "or --skip-torchvision.")
    epochs = 1 if args.quick else args.epochs
    warmup = 20 if args.quick else args.warmup_batches
    max_batches = QUICK_BATCHES if args.quick else None

    warnings.filterwarnings("ignore", module="lightning")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import torch

    # Before any parallel op, as train() does (mnistlab.threads.configure_threads): OpenMP's threads copy the main
    # thread's FTZ/DAZ when the first parallel op starts them. Set later (as this script did until this session, its
    # floor ran first), the second thread kept denormals and every epoch, floor and mnistlab, crept up 8-25 % over a
    # run as RMSprop's square averages of never-lit pixels decayed into the denormal range.
    torch.set_flush_denormal(True)
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    env = environment()
    print(f"epoch_speed: {env['cpu']}, {cores} cores, torch {env['torch']} ({torch.get_num_threads()} threads), "
          f"git {env['git']}")
    print(f"data: {data_dir}" + (f"; torchvision IDX from {raw}" if raw else ""))
    if args.quick:
        print(f"QUICK MODE: {QUICK_BATCHES} batches per 'epoch', {epochs} epoch; the numbers are extrapolated and "
              f"mean nothing, this only checks that the script runs.")

    rows: list[dict] = []
    rss_prev = peak_rss_mb()
    rss_start = rss_prev

    def record(row: dict) -> None:
        nonlocal rss_prev
        peak = peak_rss_mb()
        row.update({"peak_rss_mb": peak, "peak_rss_growth_mb": peak - rss_prev, "rss_now_mb": rss_now_mb()})
        rss_prev = peak
        rows.append(summarize(row))
        print(f"  {row['variant']:<34} {row['seconds_per_epoch_55k']:8.3f} s/epoch@55k  "
              f"{row['samples_per_second']:9.0f} samples/s", flush=True)

    x_u8, y_u8 = load_train_arrays(data_dir)
    tmp = Path(tempfile.mkdtemp(prefix="mnistlab-epoch-speed-"))
    try:
        batches = floor_batches(x_u8, y_u8, 128)
        # Process warm-up, discarded: a fresh process's first few dozen steps are many times slower (allocator,
        # oneDNN kernels, page faults), and whichever phase ran first would pay for it.
        time_floor(batches, "rmsprop", 1, warmup, max_batches=1)
        print("(b) floor ...", flush=True)
        r = time_floor(batches, "rmsprop", epochs, warmup, max_batches)
        record({"variant": "b floor bs128", "key": "b", "batch_size": 128, **r})

        if raw is not None:
            root = torchvision_root(raw, tmp / "torchvision")
            for bs in (64, 128):
                print(f"(a) torchvision bs{bs} ...", flush=True)
                r = time_torchvision(root, bs, epochs, warmup, max_batches)
                record({"variant": f"a torchvision bs{bs}", "key": f"a{bs}", "batch_size": bs, **r})
            shutil.rmtree(tmp / "torchvision", ignore_errors=True)

        threads = cores
        floor = Floor(batches[:max_batches] if max_batches else batches)
        floor()  # its own warm-up (optimizer state, allocator), discarded
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        for key, label, extra in [
            ("c", "c mnistlab mlflow (every 50 steps)", []),
            ("c_nolog", "c mnistlab logger=none", ["logger=none"]),
            ("c_step1", "c mnistlab mlflow every step", ["trainer.log_every_n_steps=1"]),
        ]:
            if key not in wanted:
                continue
            print(f"({key}) {label}, a floor epoch before each epoch ...", flush=True)
            r = time_mnistlab(data_dir, tmp, key, extra, epochs, threads, args.quick, floor)
            record({"variant": label, "key": key, "batch_size": 128, **r})
            fl = r["floor_epoch_seconds"]
            record({"variant": f"b floor interleaved with {key}", "key": f"b_{key}", "batch_size": 128,
                    "epoch_seconds": fl, "samples_per_epoch": sum(int(y.shape[0]) for _, y in floor.batches)})
            print(f"    epochs (s): mnistlab {' '.join(f'{x:.3f}' for x in r['epoch_seconds'])} | floor "
                  f"{' '.join(f'{x:.3f}' for x in fl)} | load average {os.getloadavg()[0]:.2f}", flush=True)

        print("(b) floor re-check after (c) ...", flush=True)
        torch.set_num_threads(cores)
        det = torch.are_deterministic_algorithms_enabled()
        r = time_floor(batches, "rmsprop", epochs, warmup, max_batches)
        record({"variant": "b floor bs128 (re-check)", "key": "b_recheck", "batch_size": 128,
                "deterministic_algorithms": det, **r})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    by = {r["key"]: r for r in rows}
    b = by["b_c"]["seconds_per_epoch_55k"] if "b_c" in by else by["b"]["seconds_per_epoch_55k"]
    c = by["c"]["seconds_per_epoch_55k"] if "c" in by else float("nan")
    ratios = {
        "c_over_b": {"value": c / b, "target": f"<= {TARGET_C_OVER_B}", "pass": c / b <= TARGET_C_OVER_B,
                     "uses": "median steady-state mnistlab epoch (MLflow on, default callbacks, incl. validation and "
                             "checkpoint) / median floor epoch interleaved in the same run, batch 128"},
        "c_over_b_min": {"value": min(by["c"]["epoch_seconds"]) / min(by["b_c"]["epoch_seconds"]) if "b_c" in by else float("nan"),
                         "uses": "fastest mnistlab epoch / fastest interleaved floor epoch: the least disturbed of each, "
                                 "a better estimate than the medians on a busy machine (information only)"},
        "c_over_b_alone": {"value": c / by["b"]["seconds_per_epoch_55k"],
                           "uses": "as c_over_b, b = the floor timed alone before the fit (information only)"},
        "c_train_only_over_b": {
            "value": (c - statistics.median(by["c"]["validation_seconds"] or [0.0]) * N_REF / by["c"]["samples_per_epoch"]) / b
            if "c" in by else float("nan"),
            "uses": "as c_over_b, with c's validation loop time taken out (information only)"},
        "floor_drift": {"value": by["b_recheck"]["seconds_per_epoch_55k"] / by["b"]["seconds_per_epoch_55k"],
                        "uses": "floor alone after (c) / floor alone before: machine noise indicator"},
        "loadavg_1m_end": {"value": os.getloadavg()[0], "uses": "1-minute load average at the end (2 cores)"},
    }
    if "c_nolog" in by:
        ratios["c_nolog_over_b"] = {"value": by["c_nolog"]["seconds_per_epoch_55k"] / by["b_c_nolog"]["seconds_per_epoch_55k"],
                                    "uses": "logger=none vs its interleaved floor"}
        ratios["mlflow_seconds_per_epoch"] = {"value": c - by["c_nolog"]["seconds_per_epoch_55k"],
                                              "uses": "c (MLflow on) minus c logger=none, s/epoch@55k"}
    if "c_step1" in by:
        ratios["c_step1_over_c"] = {"value": by["c_step1"]["seconds_per_epoch_55k"] / c,
                                    "uses": "MLflow every step vs every 50 steps"}
    if "a128" in by:
        a = by["a128"]["seconds_per_epoch_55k"]
        ratios["a_over_c"] = {"value": a / c, "target": f">= {TARGET_A_OVER_C}", "pass": a / c >= TARGET_A_OVER_C,
                              "uses": "a = torchvision batch 128 normalized to 55k samples (per-sample time x 55000); "
                                      "c = mnistlab, MLflow on, batch 128, per 55k-sample epoch incl. validation"}
        ratios["a64_over_c"] = {"value": by["a64"]["seconds_per_epoch_55k"] / c, "uses": "as a_over_c, a at batch 64"}

    # ---- report
    print()
    print(f"{'variant':<36}{'batch':>6}{'samples':>9}{'s/epoch':>10}{'s/ep@55k':>10}{'samples/s':>11}"
          f"{'peak RSS':>10}{'growth':>9}{'RSS now':>9}")
    for r in rows:
        now = f"{r['rss_now_mb']:.0f}" if r["rss_now_mb"] is not None else "-"
        print(f"{r['variant']:<36}{r['batch_size']:>6}{r['samples_per_epoch']:>9}{r['seconds_per_epoch']:>10.3f}"
              f"{r['seconds_per_epoch_55k']:>10.3f}{r['samples_per_second']:>11.0f}{r['peak_rss_mb']:>9.0f}M"
              f"{r['peak_rss_growth_mb']:>+8.0f}M{now:>8}M")
    print(f"(RSS in MiB; process peak before any phase: {rss_start:.0f}M. s/epoch = measured epoch over 'samples'; "
          f"s/ep@55k = per-sample time x {N_REF}.)")
    for key in [k for k in ("c", "c_nolog", "c_step1") if k in by]:
        r = by[key]
        val = statistics.fmean(r["validation_seconds"]) if r["validation_seconds"] else float("nan")
        print(f"  {r['variant']}: per epoch {r['seconds_per_epoch']:.3f}s of which validation loop {val:.3f}s; "
              f"mnistlab's own fit_seconds/epochs = {r['fit_seconds']:.2f}/{r['epochs']} = "
              f"{r['fit_seconds_per_epoch']:.3f}s (incl. set-up, sanity check and the warm-up epoch "
              f"{r['warmup_epoch_seconds']:.3f}s)")
    print()
    for name, d in ratios.items():
        tgt = f"  target {d['target']}: {verdict(d['pass'])}" if "target" in d else ""
        print(f"{name:<26}{d['value']:8.3f}{tgt}    [{d['uses']}]")
    if "a_over_c" not in ratios:
        print("a_over_c: not measured (--skip-torchvision)")
    if abs(ratios["floor_drift"]["value"] - 1) > 0.10:
        print("WARNING: the floor moved by more than 10% between the start and the end: the machine was busy or "
              "throttling; rerun before trusting the ratios.")
    if args.quick:
        print("QUICK MODE: not a measurement (tiny, extrapolated); run without --quick for real numbers.")

    payload = {
        "benchmark": "epoch_speed",
        "quick": args.quick,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": {**env, "torch_threads": cores},
        "normalized_samples": N_REF,
        "variants": rows,
        "ratios": ratios,
    }
    path = write_json(payload, "epoch_speed_quick.json" if args.quick else "epoch_speed.json", args.json)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
