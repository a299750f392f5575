"""RMSprop as Keras computes it, to measure how much the book's optimizer differs from torch.optim.RMSprop.

Keras (keras/src/optimizers/rmsprop.py): v = rho v + (1 - rho) g^2, w -= lr g / sqrt(v + eps), v starts at 0.
torch.optim.RMSprop divides by sqrt(v) + eps instead. Written by hand because no maintained torch package has
Keras' form (timm's RMSpropTF puts eps inside the sqrt too, but starts v at ones, as TF1 did).
"""

from __future__ import annotations

import torch


def keras_rmsprop_(param: torch.Tensor, grad: torch.Tensor, square_avg: torch.Tensor, lr: float, alpha: float,
                   eps: float) -> None:
    """One Keras RMSprop update in place (also each stacked member's: mnistlab.stacked.nets)."""
    square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
    param.addcdiv_(grad, square_avg.add(eps).sqrt_(), value=-lr)


class KerasRMSprop(torch.optim.Optimizer):
    """Keras' RMSprop without momentum, centering or weight decay (the book uses none of them)."""

    def __init__(self, params, lr: float = 1e-3, alpha: float = 0.9, eps: float = 1e-7, momentum: float = 0.0,
                 centered: bool = False, weight_decay: float = 0.0):
        if momentum or centered or weight_decay:
            raise ValueError(
                f"KerasRMSprop (optimizer=rmsprop_keras) has no momentum, centering or weight decay; got "
                f"momentum={momentum}, centered={centered}, weight_decay={weight_decay}: set them to 0/false "
                "or use optimizer=rmsprop."
            )
        super().__init__(params, {"lr": lr, "alpha": alpha, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                v = self.state[p].setdefault("square_avg", torch.zeros_like(p))
                keras_rmsprop_(p, p.grad, v, group["lr"], group["alpha"], group["eps"])
        return loss
