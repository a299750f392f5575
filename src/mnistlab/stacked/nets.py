"""The stacked math: M members' MLP weights along a leading dim, their batches, their optimizer updates.

Every operation reproduces, per member, the float32 arithmetic of the ordinary run (nn.Linear's addmm, torch.optim's
SGD/RMSprop and mnistlab.optim.KerasRMSprop written with Python-scalar hyperparameters), so a member's weights
match its one-by-one run with the same torch thread count bit for bit (tests/test_stacked.py checks the results end
to end). The one exception is the shared-batch first layer (StackedMLP), bitwise only where the gemm's blocking
matches the member's own (the book's 512-wide layer at 1 thread here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mnistlab.data.datamodule import DeviceBatches, epoch_permutation
from mnistlab.optim import keras_rmsprop_

# Optimizer families that can be stacked: name of the optimizer config's _target_ -> rule.
SGD, RMSPROP, RMSPROP_MOMENTUM, KERAS = "sgd", "rmsprop", "rmsprop_momentum", "rmsprop_keras"
TARGETS = {"torch.optim.SGD": SGD, "torch.optim.RMSprop": RMSPROP, "mnistlab.optim.KerasRMSprop": KERAS}
# optimizer config keys each rule honours (anything else set to a non-default value is not stackable)
KEYS = {
    SGD: {"lr", "momentum", "nesterov", "weight_decay", "dampening"},
    RMSPROP: {"lr", "alpha", "eps", "momentum", "centered", "weight_decay"},
    KERAS: {"lr", "alpha", "eps", "momentum", "centered", "weight_decay"},
}


def optimizer_rule(opt: dict) -> tuple[str | None, str]:
    """(the stacked rule of an optimizer config, or None and why it cannot be stacked)."""
    rule = TARGETS.get(str(opt.get("_target_")))
    if rule is None:
        return None, f"optimizer {opt.get('name')} ({opt.get('_target_')}) has no stacked update"
    extra = set(opt) - KEYS[rule] - {"name", "_target_", "_partial_"}
    if extra:
        return None, f"optimizer keys {sorted(extra)} have no stacked update"
    if opt.get("dampening") or opt.get("centered") or opt.get("maximize"):
        return None, "dampening/centered/maximize have no stacked update"
    if rule == RMSPROP and opt.get("momentum"):
        rule = RMSPROP_MOMENTUM  # its own slice: its update rounds differently from momentum-free RMSprop's
    return rule, ""


def linear_layers(net: nn.Sequential) -> list[nn.Linear]:
    return [m for m in net if isinstance(m, nn.Linear)]


class StackedMLP(nn.Module):
    """The members' nets (nets.MLP's Linear/activation stacks, no dropout) as one: layer i holds weights [M, out, in]
    (nn.Linear's layout) and biases [M, out], so the optimizer updates all members with a few tensor ops.

    Forward: each member's layers as nn.Linear computes them (F.linear on unbind() views, whose backward stacks the
    members' gradients in one tensor), which is bit-identical to the member's ordinary run at the same torch thread
    count. Measured on this 2-core CPU, 12 members, forward+backward, 2 threads: batch 32 4.9 ms (baddbmm 6.1 ms),
    batch 128 11.2 ms (baddbmm 21.6 ms), batch 512 36.0 ms (36.9 ms); torch.func.vmap(functional_call) was slower
    than baddbmm (12 members, batch 128, 1 thread: 17.6 vs 15.3 ms). A batched matmul on this CPU runs one
    single-threaded gemm per member, at half the speed of the per-member gemms.

    When every member gets the same batch (members of one seed share the batch order; validation always), the first
    layer, ~98 % of the arithmetic, is ONE gemm against all members' weights ([M*out, in] is a view of the stack): a
    wide gemm instead of M narrow ones. 6 members of the book's 784-512-10, forward+backward, 1 thread: batch 32 2.8
    against 4.0-4.7 ms, batch 128 8.1 against 10.0 ms, batch 512 33.0 against 33.1 ms. For the 512-wide layer it is
    still bit-identical per member at 1 thread on this CPU (tests/test_stacked.py); narrower layers (64, 128) or 2
    threads at batch 32 block the gemm differently here, so members agree with their own runs up to float rounding.
    """

    def __init__(self, nets: list[nn.Sequential]):
        super().__init__()
        self.members = len(nets)
        layers = [linear_layers(n) for n in nets]
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.stack([ls[i].weight.detach() for ls in layers])) for i in range(len(layers[0]))])
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.stack([ls[i].bias.detach() for ls in layers])) for i in range(len(layers[0]))])
        # the activation modules between the layers, as the first member's net has them (relu, tanh, ...)
        self.activations = [m for m in nets[0] if not isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, B, in] (each member's batch), or [B, in] (the same batch for every member) -> logits [M, B, classes]."""
        first = 0
        if x.dim() == 2:  # shared batch: layer 0 for all members in one gemm, then member m's rows are h[:, m]
            w, b = self.weights[0], self.biases[0]
            h = nn.functional.linear(x, w.view(-1, w.shape[2]), b.view(-1)).view(x.shape[0], self.members, w.shape[1])
            if self.activations:
                h = self.activations[0](h)
            # unbind, not h[:, m]: its backward stacks the members' gradients; select's would add M full-size zeros
            inputs, first = h.unbind(1), 1
        else:
            inputs = x.unbind(0)
        weights = [w.unbind(0) for w in self.weights]
        biases = [b.unbind(0) for b in self.biases]
        out = []
        for m in range(self.members):
            h = inputs[m]
            for i in range(first, len(weights)):
                h = nn.functional.linear(h, weights[i][m], biases[i][m])
                if i < len(self.activations):
                    h = self.activations[i](h)
            out.append(h)
        return torch.stack(out)

    def member_state(self, m: int) -> dict[str, torch.Tensor]:
        """Member m's weights as the ordinary net's state_dict (keys "0.weight", "0.bias", "2.weight", ...)."""
        state, j = {}, 0
        for k in range(len(self.weights) + len(self.activations)):
            if k % 2 == 0:
                state[f"{k}.weight"] = self.weights[j][m].detach().clone()
                state[f"{k}.bias"] = self.biases[j][m].detach().clone()
                j += 1
        return state


def member_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each member's mean cross-entropy over its batch: [M, B, C], [M, B] -> [M]."""
    m, b, c = logits.shape
    return nn.functional.cross_entropy(logits.reshape(m * b, c), y.reshape(m * b), reduction="none").view(m, b).mean(1)


@dataclass
class Hyper:
    """Per-member SGD hyperparameters, float32 [M] tensors (the values torch.optim's kernels cast their Python floats
    to), broadcast over the stacked SGD slice in one op each."""

    neg_lr: torch.Tensor
    momentum: torch.Tensor
    nesterov: torch.Tensor  # bool
    weight_decay: torch.Tensor

    @classmethod
    def of(cls, opts: list[dict], device: torch.device | str = "cpu") -> "Hyper":
        def t(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            neg_lr=t([-float(o["lr"]) for o in opts]),
            momentum=t([float(o.get("momentum", 0.0) or 0.0) for o in opts]),
            nesterov=t([bool(o.get("nesterov", False)) for o in opts], torch.bool),
            weight_decay=t([float(o.get("weight_decay", 0.0) or 0.0) for o in opts]),
        )



class StackedOptimizer(torch.optim.Optimizer):
    """Per-member SGD (momentum, nesterov, weight decay), torch RMSprop (with or without momentum) and Keras RMSprop.
    The members of one rule are a contiguous slice (the caller orders them). SGD updates its slice with a few
    broadcast tensor ops per parameter; the RMSprop family runs torch.optim's own single-tensor ops per member with
    Python-float hyperparameters (as exact as torch.optim by construction, and no host sync on a GPU): broadcasting
    [M,1,1] hyperparameter tensors needs temporaries (grad * (1 - alpha), grad * -lr), which made 2 members' W1
    update 2.8 ms against 1.1 ms per member (1 thread, this CPU); SGD's broadcast ops cost the same either way.

    A frozen member (freeze()) stops: lr 0 in the SGD slice, skipped in the per-member updates, weights and state
    zeroed (finite: its loss stays finite), no mask per step."""

    def __init__(self, params, rules: list[str], opts: list[dict]):
        super().__init__(list(params), {})
        # on the parameters' device (Lightning builds the optimizer after moving the module): no copy per step
        self.hyper = Hyper.of(opts, self.param_groups[0]["params"][0].device)
        self.frozen: set[int] = set()
        self.slices: list[tuple[str, slice]] = []
        start = 0
        for i in range(1, len(rules) + 1):
            if i == len(rules) or rules[i] != rules[start]:
                self.slices.append((rules[start], slice(start, i)))
                start = i
        if len({r for r, _ in self.slices}) != len(self.slices):
            raise ValueError(f"members of one optimizer rule must be contiguous: {rules}")
        # the RMSprop family's per-member hyperparameters as Python floats, read once, not per parameter and step
        self.rms = {m: self._rms_hyper(rule, opts[m]) for m, rule in enumerate(rules) if rule != SGD}
        # which optional terms each SGD slice needs, decided once from the configs: no host sync per step on a GPU
        self.terms = {sl.start: {k: any(float(o.get(k, 0) or 0) != 0 for o in opts[sl]) for k in
                                 ("weight_decay", "momentum", "nesterov")} for _, sl in self.slices}

    def freeze(self, m: int) -> None:
        """Member m stops training (its loss went non-finite): zero weights and state, lr 0, no more updates."""
        with torch.no_grad():
            self.frozen.add(m)
            self.hyper.neg_lr[m] = 0.0
            for group in self.param_groups:
                for p in group["params"]:
                    p[m].zero_()
                    for buf in self.state[p].values():
                        buf[m].zero_()

    @torch.no_grad()
    def step(self, closure=None):
        h = self.hyper
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                for rule, sl in self.slices:
                    if rule == SGD:
                        self._sgd(p, state, sl, h)
                    else:
                        for m in range(sl.start, sl.stop):
                            if m not in self.frozen:
                                self._rmsprop(p, state, m, rule, *self.rms[m])

    @staticmethod
    def _buffer(state: dict, name: str, p: torch.Tensor) -> torch.Tensor:
        if name not in state:
            state[name] = torch.zeros_like(p)
        return state[name]

    def _sgd(self, p, state, sl, h: Hyper) -> None:
        """torch.optim.SGD: grad += weight_decay param; buf = grad on the first step (zeros * momentum + grad: the
        same value), then buf = momentum buf + grad; d = grad + momentum buf (nesterov) or buf; param -= lr d. Members
        without momentum get buf = 0 * buf + grad = grad."""
        shape = (-1,) + (1,) * (p.dim() - 1)
        P, G = p[sl], p.grad[sl]
        terms = self.terms[sl.start]
        if terms["weight_decay"]:  # grad.add(param, alpha=weight_decay)
            G = torch.addcmul(G, P, h.weight_decay[sl].view(shape))
        if terms["momentum"]:
            momentum = h.momentum[sl].view(shape)
            buf = self._buffer(state, "momentum_buffer", p)[sl]
            buf.mul_(momentum).add_(G)
            d = buf
            if terms["nesterov"]:
                d = torch.where(h.nesterov[sl].view(shape), torch.addcmul(G, buf, momentum), buf)
        else:
            d = G
        P.addcmul_(d, h.neg_lr[sl].view(shape))  # == param.add_(d, alpha=-lr), the same rounding (checked bitwise)

    @staticmethod
    def _rms_hyper(rule: str, opt: dict) -> tuple[float, float, float, float, float]:
        """(lr, alpha, eps, weight_decay, momentum) of an RMSprop-family config, with its class's defaults."""
        alpha, eps = (0.9, 1e-7) if rule == KERAS else (0.99, 1e-8)  # KerasRMSprop's and torch.optim.RMSprop's
        return (float(opt["lr"]), float(opt.get("alpha", alpha)), float(opt.get("eps", eps)),
                float(opt.get("weight_decay", 0) or 0), float(opt.get("momentum", 0) or 0))

    def _rmsprop(self, p, state, m: int, rule: str, lr: float, alpha: float, eps: float, weight_decay: float,
                 momentum: float) -> None:
        """Member m's torch.optim.RMSprop (eps outside the sqrt; _single_tensor_rmsprop, centered=False) or
        KerasRMSprop (eps inside) step, the same ops on views of the stacked tensors."""
        P, G = p[m], p.grad[m]
        if weight_decay:
            G = G.add(P, alpha=weight_decay)
        sq = self._buffer(state, "square_avg", p)[m]
        if rule == KERAS:
            keras_rmsprop_(P, G, sq, lr, alpha, eps)
            return
        sq.mul_(alpha).addcmul_(G, G, value=1 - alpha)
        avg = sq.sqrt().add_(eps)
        if rule == RMSPROP_MOMENTUM:
            buf = self._buffer(state, "momentum_buffer", p)[m]
            buf.mul_(momentum).addcdiv_(G, avg)
            P.add_(buf, alpha=-lr)
        else:
            P.addcdiv_(G, avg, value=-lr)


class StackedBatches:
    """Each member's training batches, as its ordinary run's DeviceBatches gives them for its seed: [M, B, in], [M, B];
    or, when all members share one seed (hence one batch order), the batch once, [B, in] and y as an [M, B] view, which
    StackedMLP computes with one wide first-layer gemm.

    The members' permutations come from the same (seed, epoch)-seeded CPU generators; rows are gathered a chunk at a
    time with one index_select for all members (~1k rows in all, like DeviceBatches), then sliced as views."""

    CHUNK_ROWS = DeviceBatches.CHUNK_ROWS

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seeds: list[int], epoch_fn):
        self.x, self.y, self.batch_size, self.seeds, self.epoch_fn = x, y, batch_size, seeds, epoch_fn

    def __len__(self) -> int:
        return (self.y.shape[0] + self.batch_size - 1) // self.batch_size

    def indices(self) -> torch.Tensor:
        """The epoch's row order per distinct seed: [1, n] when the members share their seed, else [M, n]."""
        n, epoch = self.y.shape[0], int(self.epoch_fn())
        seeds = self.seeds[:1] if len(set(self.seeds)) == 1 else self.seeds
        return torch.stack([epoch_permutation(n, s, epoch) for s in seeds]).to(self.y.device)

    def __iter__(self):
        idx = self.indices()
        m, bs, shared = idx.shape[0], self.batch_size, idx.shape[0] < len(self.seeds)
        chunk = bs * max(1, self.CHUNK_ROWS // (bs * m))
        for c0 in range(0, idx.shape[1], chunk):
            sel = idx[:, c0 : c0 + chunk]
            rows = sel.shape[1]
            xc = self.x.index_select(0, sel.reshape(-1)).view(m, rows, -1)
            yc = self.y.index_select(0, sel.reshape(-1)).view(m, rows)
            for s in range(0, rows, bs):
                if shared:
                    yield xc[0, s : s + bs], yc[:, s : s + bs].expand(len(self.seeds), -1)
                else:
                    yield xc[:, s : s + bs], yc[:, s : s + bs]
