"""The GPU-correct paths, checked on the CPU (issue 25): the stacked model and optimizer create their tensors on the
parameters' device (run on the meta device, where a CPU tensor meeting a meta one is an error), and the per-step
work of a training step (batches, forward, loss, backward, update, the epoch sums) asks the device for no host value
(.item(), bool() and nonzero() are aten ops a dispatch mode sees: each is a host sync on a GPU)."""

from __future__ import annotations

import pytest
import torch

from conftest import compose, fast_overrides
from mnistlab.compat import TorchDispatchMode, compiled_graphs
from mnistlab.data.datamodule import DeviceBatches
from mnistlab.model import MnistMLP
from mnistlab.nets import MLP
from mnistlab.stacked.nets import StackedBatches, StackedMLP, StackedOptimizer, member_losses, optimizer_rule
from mnistlab.train import train

# one member of each stacked update rule (and the SGD slice's optional terms)
OPTS = [
    {"_target_": "torch.optim.SGD", "lr": 0.1},
    {"_target_": "torch.optim.SGD", "lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
    {"_target_": "torch.optim.RMSprop", "lr": 1e-3, "alpha": 0.9, "eps": 1e-7},
    {"_target_": "torch.optim.RMSprop", "lr": 1e-3, "alpha": 0.9, "eps": 1e-7, "momentum": 0.5},
    {"_target_": "mnistlab.optim.KerasRMSprop", "lr": 1e-3, "alpha": 0.9, "eps": 1e-7},
]
# aten ops that copy a device value to the host (what .item(), bool(t), t.nonzero() dispatch to)
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal"}


class HostSyncs(TorchDispatchMode):
    """Records every aten op that reads a tensor's value back to the host."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in SYNC_OPS:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _stack(device: str, members: int = len(OPTS)):
    nets = [MLP(784, [32], 10, "relu", 0.0) for _ in range(members)]
    stack = StackedMLP(nets).to(device)
    opt = StackedOptimizer(stack.parameters(), [optimizer_rule(o)[0] for o in OPTS[:members]], OPTS[:members])
    return stack, opt


def test_stacked_optimizer_state_lives_on_the_parameters_device():
    """Every stacked tensor on the meta device: the hyperparameters are made there (not on the CPU and copied per
    step), and a step of every rule, with shared and per-member batches and a frozen member, runs there."""
    stack, opt = _stack("meta")
    assert {t.device.type for t in vars(opt.hyper).values()} == {"meta"}
    m = stack.members
    y = torch.randint(0, 10, (m, 8), device="meta")
    for x in (torch.rand(8, 784, device="meta"), torch.rand(m, 8, 784, device="meta")):
        opt.zero_grad()
        member_losses(stack(x), y).sum().backward()
        opt.step()
    opt.freeze(1)
    opt.step()
    states = [t for s in opt.state.values() for t in s.values()]
    assert states and {t.device.type for t in states} == {"meta"}


@pytest.mark.parametrize("shared", [True, False], ids=["one-seed", "per-member-seeds"])
def test_stacked_steps_read_nothing_back(shared: bool):
    """An epoch of stacked batches and steps (forward, member losses, backward, every update rule, the epoch sums as
    StackedModule keeps them) makes no host sync: on a GPU each would stall the step queue."""
    torch.manual_seed(0)
    stack, opt = _stack("cpu")
    m = stack.members
    x, y = torch.rand(300, 784), torch.randint(0, 10, (300,))
    seeds = [0] * m if shared else list(range(m))
    batches = StackedBatches(x, y, 32, seeds, lambda: 0)
    loss_sum, correct = torch.zeros(m), torch.zeros(m, dtype=torch.int64)
    with HostSyncs() as syncs:
        for xb, yb in batches:
            opt.zero_grad()
            logits = stack(xb)
            losses = member_losses(logits, yb)
            losses.sum().backward()
            opt.step()
            loss_sum.add_(losses.detach())
            correct.add_((logits.detach().argmax(dim=2) == yb).sum(1))
    assert len(batches) == 10 and int(correct.sum()) > 0
    assert syncs.seen == []


def test_single_run_steps_read_nothing_back():
    """MnistMLP's per-step work outside Lightning's loop: DeviceBatches' batches, the forward and loss, the direct
    backward and torch.optim step, the on-device epoch sums (_accumulate_train)."""
    torch.manual_seed(0)
    model = MnistMLP(
        model={"input_size": 784, "hidden_sizes": [32], "num_classes": 10, "activation": "relu", "dropout": 0.0},
        optimizer={"name": "rmsprop", "_target_": "torch.optim.RMSprop", "_partial_": True, "lr": 1e-3},
    )
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    x, y = torch.rand(300, 784), torch.randint(0, 10, (300,))
    batches = DeviceBatches(x, y, 32, shuffle=True, seed=0)
    with HostSyncs() as syncs:
        for xb, yb in batches:
            opt.zero_grad()
            logits = model(xb)
            loss = model.loss_fn(logits, yb)
            loss.backward()
            opt.step()
            model._accumulate_train(logits.detach(), yb, loss.detach())
    assert model._train_counts == [10, 300]
    assert syncs.seen == []


def test_the_recorder_sees_a_host_sync():
    """The checks above can fail: .item(), bool() and nonzero() are each seen."""
    with HostSyncs() as syncs:
        torch.ones(3).sum().item()
        bool(torch.ones(1) > 0)
        torch.ones(3).nonzero()
    assert syncs.seen == ["aten::_local_scalar_dense", "aten::_local_scalar_dense", "aten::nonzero"]


@pytest.mark.slow
def test_a_compiled_net_trains_as_the_eager_one_on_the_cpu(tmp_path, processed_dir):
    """compile=default (torch.compile of the net, in place): the same curves and test metrics as the eager run, up to
    float rounding (inductor fuses the bias and activation), its checkpoint's keys the eager net's."""
    runs, graphs = {}, []
    for name, extra in (("eager", []), ("compiled", ["compile=default"])):
        runs[name] = train(compose(fast_overrides(tmp_path / name, processed_dir, epochs=1) + ["logger=none"] + extra))
        graphs.append(compiled_graphs())
    assert graphs[1] > graphs[0]  # the compiled run did compile (the eager one did not)
    for key in ("test/acc", "val/acc_best"):
        assert runs["compiled"][key] == pytest.approx(runs["eager"][key], abs=0.011), key  # 1 of 100 val images
    assert runs["compiled"]["test/loss"] == pytest.approx(runs["eager"]["test/loss"], rel=1e-4)
    keys = [set(torch.load(tmp_path / n / "out" / "checkpoints" / "best.ckpt", weights_only=False)["state_dict"])
            for n in runs]
    assert keys[0] == keys[1]
