"""mnistlab on one GPU: the bare floor, the real command, a default run's test accuracy, the study stacked vs one at a time.

Prints (and writes) one JSON. Every part runs on real MNIST (data/processed; made from data/raw/mnist.npz first when
missing) and is guarded: a part that fails or runs out of its time records its error and the tail of its log, and the
parts after it still run. Under 5 minutes on an H200.

  floor        forward + backward + RMSprop step of the book's MLP on batches already on the GPU (pre-shuffled float
               slices), one timed pass per epoch after a warm-up epoch, synchronized at each epoch's end; batch 128 and
               32. Two lower floors for scale: the same step captured whole in a CUDA graph (RMSprop capturable=True,
               full batches, scaled to the epoch) and the net under torch.compile(mode="reduce-overhead"), which
               the real command offers as compile=reduce-overhead (timed last, batch 32, if time is left).
  command      the real `python -m mnistlab.train data.batch_size=B` (default config: progress bar, MLflow, checkpoints,
               output to a file), per epoch as the median gap between the val/acc timestamps MLflow recorded (epoch 1,
               with start-up and the sanity check, excluded); batch 128 for the default 5 epochs (its test/acc is the
               default run's), batch 32 for 4, and batch 32 without the progress bar (callbacks.rich_progress_bar=null).
  study        `python -m mnistlab.train sweep=optimizers study.seeds=1` (36 trials x 5 epochs) with launcher=stacked;
               one at a time (launcher=basic) on the lr=0.01 quarter of it (9 trials: every optimizer x batch size), its
               wall time x 4 as the 36-trial estimate (a trial's time on a GPU does not depend on its lr), and stacked on
               the same quarter for a like-for-like ratio.

    python benchmarks/gpu.py --out benchmarks/results/gpu.json
    python benchmarks/gpu.py --quick          # seconds, CPU or GPU: checks the script, not a benchmark
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from command_speed import epoch_gaps  # noqa: E402  (the command's epochs from MLflow's records, as on the CPU)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "processed"
N_TRAIN = 55000
# the lr=0.01 quarter of the study: every optimizer x batch size once, 9 trials
QUARTER = ["study.lrs=[0.01]"]
QUICK = ["trainer.limit_train_batches=20", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]


def log(msg: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def environment() -> dict:
    import torch

    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cores": os.cpu_count(), "device": "cpu"}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                   memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count)
    for name in ("lightning", "torchmetrics", "mlflow", "hydra"):
        try:
            env[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            env[name] = f"unavailable: {e}"
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm",
                                            "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    try:
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                    check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["git"] = "unknown"
    return env


def ensure_data(quick: bool) -> Path:
    if not (DATA / "meta.json").is_file():
        log("no data/processed: running the preprocess stage on data/raw/mnist.npz")
        subprocess.run([sys.executable, "-m", "mnistlab.data.preprocess", "hydra.run.dir=logs/gpu-preprocess"], cwd=ROOT,
                       check=True)
    return DATA


# ---------------------------------------------------------------- floor

def _mlp(device):
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10)).to(device)


def _batches(device, batch_size: int):
    import numpy as np
    import torch

    x = torch.from_numpy(np.load(DATA / "x_train.npy")).to(device).reshape(-1, 784).float().div_(255.0)
    y = torch.from_numpy(np.load(DATA / "y_train.npy")).to(device).long()
    perm = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(0)).to(device)
    x, y = x[perm].contiguous(), y[perm].contiguous()
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, y.shape[0], batch_size)]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def floor_eager(device, batch_size: int, epochs: int, limit: int | None, compiled: bool = False) -> dict:
    """Seconds per epoch of a plain fwd+bwd+step loop (the least a Python training loop can cost)."""
    import torch
    from torch import nn

    batches = _batches(device, batch_size)[:limit]
    model, loss_fn = _mlp(device), nn.CrossEntropyLoss()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    net = torch.compile(model, mode="reduce-overhead") if compiled else model

    def epoch():
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            opt.step()
        _sync(device)

    t0 = time.perf_counter()
    epoch()  # warm-up (and compilation)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        epoch()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"epoch_seconds": times, "median_epoch_seconds": med, "steps": len(batches),
            "us_per_step": med / len(batches) * 1e6, "first_epoch_seconds": warm}


def floor_graph(device, batch_size: int, epochs: int, limit: int | None) -> dict:
    """The whole step (forward, backward, RMSprop capturable) as one CUDA graph replayed per batch: the GPU's own floor
    for this model, with almost no per-step Python. Full batches only; the epoch scaled to all of them."""
    import torch
    from torch import nn

    batches = [b for b in _batches(device, batch_size) if b[1].shape[0] == batch_size][:limit]
    model, loss_fn = _mlp(device), nn.CrossEntropyLoss()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7, capturable=True)
    sx, sy = batches[0][0].clone(), batches[0][1].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(sx), sy).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss_fn(model(sx), sy).backward()
        opt.step()
    times = []
    for _ in range(epochs + 1):
        t0 = time.perf_counter()
        for x, y in batches:
            sx.copy_(x)
            sy.copy_(y)
            graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = times[1:]
    steps = math.ceil(N_TRAIN / batch_size)
    med = statistics.median(times) * steps / len(batches)
    return {"epoch_seconds_scaled": [t * steps / len(batches) for t in times], "median_epoch_seconds": med,
            "us_per_step": med / steps * 1e6}


def stacked_step(device, members: int, batch_size: int, steps: int) -> dict:
    """ms per step of a stack (mnistlab.stacked: StackedMLP + StackedOptimizer, RMSprop), one shared batch."""
    import torch

    from mnistlab.nets import MLP
    from mnistlab.stacked.nets import StackedMLP, StackedOptimizer, member_losses

    opt_cfg = {"_target_": "torch.optim.RMSprop", "lr": 1e-3, "alpha": 0.9, "eps": 1e-7}
    stack = StackedMLP([MLP(784, [512], 10, "relu", 0.0) for _ in range(members)]).to(device)
    opt = StackedOptimizer(stack.parameters(), ["rmsprop"] * members, [opt_cfg] * members)
    x = torch.rand(batch_size, 784, device=device)
    y = torch.randint(0, 10, (members, batch_size), device=device)
    for i in range(steps + 10):
        if i == 10:
            _sync(device)
            t0 = time.perf_counter()
        opt.zero_grad()
        member_losses(stack(x), y).sum().backward()
        opt.step()
    _sync(device)
    ms = (time.perf_counter() - t0) / steps * 1000
    return {"members": members, "batch_size": batch_size, "ms_per_step": ms, "ms_per_member_step": ms / members}


# ---------------------------------------------------------------- the real command

def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MNISTLAB_PARENT_RUN_ID", "MNISTLAB_ROOT")}
    env.update(PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1")
    return env


def _run(cmd: list[str], log_path: Path, timeout: float) -> dict:
    log(" ".join(cmd[1:]))
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    r = {"command": " ".join(cmd[1:]), "returncode": rc, "wall_seconds": round(wall, 2)}
    if rc != 0:
        r["log_tail"] = log_path.read_text(errors="replace").splitlines()[-40:]
    log(f"  rc={rc} in {wall:.1f}s")
    return r


def command(tmp: Path, name: str, batch_size: int, epochs: int | None, extra: list[str], timeout: float) -> dict:
    mlruns, run_dir = tmp / f"mlruns_{name}", tmp / f"run_{name}"
    cmd = [sys.executable, "-m", "mnistlab.train", f"data.batch_size={batch_size}", f"paths.mlruns_dir={mlruns}",
           f"hydra.run.dir={run_dir}", *([f"trainer.max_epochs={epochs}"] if epochs else []), *extra]
    r = _run(cmd, tmp / f"{name}.log", timeout)
    if (run_dir / "metrics.json").is_file():
        r["metrics"] = json.loads((run_dir / "metrics.json").read_text())
    if (mlruns / "mlflow.db").is_file():
        gaps = epoch_gaps(mlruns / "mlflow.db")
        r["epoch_gaps_seconds"] = [round(g, 3) for g in gaps]
        if gaps:
            r["median_epoch_seconds"] = statistics.median(gaps)
            r["steps_per_epoch"] = math.ceil(N_TRAIN / batch_size)
            r["us_per_step"] = r["median_epoch_seconds"] / r["steps_per_epoch"] * 1e6
    return r


def study(tmp: Path, name: str, launcher: str, overrides: list[str], timeout: float) -> dict:
    sweep_dir = tmp / f"sweep_{name}"
    cmd = [sys.executable, "-m", "mnistlab.train", "sweep=optimizers", "study.seeds=1", f"launcher={launcher}",
           *overrides, f"paths.mlruns_dir={tmp / f'mlruns_{name}'}", f"hydra.sweep.dir={sweep_dir}"]
    r = _run(cmd, tmp / f"{name}.log", timeout)
    statuses = [json.loads(f.read_text())["status"] for f in sweep_dir.glob("*/.mnistlab_trial.json")]
    r.update(trials=len(statuses), finished=statuses.count("FINISHED"))
    lines = (tmp / f"{name}.log").read_text(errors="replace").splitlines()
    r["stacks"] = [ln.split("launcher=stacked: ", 1)[1] for ln in lines if "launcher=stacked: " in ln]
    r["summary"] = [ln for ln in lines if "chosen on validation" in ln][-1:]
    return r


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/gpu.json (--quick: gpu_quick.json)")
    ap.add_argument("--quick", action="store_true", help="a few batches everywhere: checks the script, not a benchmark")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds for the whole script (parts stop at it)")
    args = ap.parse_args(argv)
    args.out = args.out or ROOT / "benchmarks" / "results" / ("gpu_quick.json" if args.quick else "gpu.json")

    import torch

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict = {"benchmark": "gpu", "quick": args.quick, "environment": environment(), "parts": {}}
    if device.type != "cuda":
        out["note"] = "no CUDA device: the script ran on the CPU (only --quick is meaningful there)"
    ensure_data(args.quick)
    limit, epochs = (5, 1) if args.quick else (None, 3)
    quick = QUICK if args.quick else []

    def left() -> float:
        return args.budget - (time.perf_counter() - start)

    def part(name: str, fn, *a, **kw) -> None:
        if left() < 5:
            out["parts"][name] = {"skipped": "out of the time budget"}
        else:
            try:
                out["parts"][name] = fn(*a, **kw)
            except Exception as e:  # noqa: BLE001 - one part's failure is a result; the others still run
                out["parts"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        log(f"{name}: {json.dumps(out['parts'][name])[:400]}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")  # after every part: a killed run keeps what it measured

    for bs in (128, 32):
        part(f"floor_bs{bs}", floor_eager, device, bs, epochs, limit)
    if device.type == "cuda":
        for bs in (128, 32):
            part(f"floor_cuda_graph_bs{bs}", floor_graph, device, bs, epochs, limit)
    for m in (1, 12):
        part(f"stacked_step_{m}_members_bs128", stacked_step, device, m, 128, 5 if args.quick else 200)

    tmp = Path(tempfile.mkdtemp(prefix="mnistlab-gpu-"))
    try:
        part("command_bs128", lambda: command(tmp, "bs128", 128, 1 if args.quick else None, quick, min(left(), 90)))
        part("command_bs32", lambda: command(tmp, "bs32", 32, 1 if args.quick else 4, quick, min(left(), 90)))
        part("command_bs32_no_bar", lambda: command(tmp, "bs32_nobar", 32, 1 if args.quick else 4,
                                                    quick + ["callbacks.rich_progress_bar=null"], min(left(), 90)))
        sq = quick + (["study.max_epochs=1", "study.batch_sizes=[128]"] if args.quick else [])
        part("study_stacked_36", lambda: study(tmp, "stacked36", "stacked", sq, min(left(), 150)))
        part("study_basic_quarter", lambda: study(tmp, "basic9", "basic", sq + QUARTER, min(left(), 120)))
        part("study_stacked_quarter", lambda: study(tmp, "stacked9", "stacked", sq + QUARTER, min(left(), 90)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if device.type == "cuda":  # last: compilation takes tens of seconds
        part("floor_compiled_bs32", floor_eager, device, 32, epochs, limit, compiled=True)
        tmp = Path(tempfile.mkdtemp(prefix="mnistlab-gpu-"))
        try:
            part("command_bs32_compiled", lambda: command(tmp, "bs32_compiled", 32, 1 if args.quick else 4,
                                                          quick + ["compile=reduce-overhead"], min(left(), 120)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    p = out["parts"]
    summary = {}
    for bs in (128, 32):
        fl, c = p.get(f"floor_bs{bs}", {}), p.get(f"command_bs{bs}", {})
        if "median_epoch_seconds" in fl and "median_epoch_seconds" in c:
            summary[f"command_over_floor_bs{bs}"] = c["median_epoch_seconds"] / fl["median_epoch_seconds"]
    if "metrics" in p.get("command_bs128", {}):
        summary["default_run_test_acc"] = p["command_bs128"]["metrics"].get("test/acc")
    basic, st9, st36 = p.get("study_basic_quarter", {}), p.get("study_stacked_quarter", {}), p.get("study_stacked_36", {})
    if basic.get("returncode") == 0 and st9.get("returncode") == 0:
        summary["study_quarter_basic_over_stacked"] = basic["wall_seconds"] / st9["wall_seconds"]
    if basic.get("returncode") == 0 and st36.get("returncode") == 0:
        summary["study_36_one_at_a_time_estimate_seconds"] = basic["wall_seconds"] * 4
        summary["study_36_stacked_seconds"] = st36["wall_seconds"]
        summary["study_36_speedup_stacked_over_one_at_a_time"] = basic["wall_seconds"] * 4 / st36["wall_seconds"]
    out["summary"] = summary
    out["total_seconds"] = round(time.perf_counter() - start, 1)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
