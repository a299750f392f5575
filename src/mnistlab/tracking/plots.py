"""The figures a run logs: learning curves, test confusion matrix, a grid of misclassified test digits."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from mnistlab.metrics import CURVE_KEYS


def curves_figure(rows: list[dict[str, float]], title: str = ""):
    """One panel per metric of metrics.CURVE_KEYS (loss, acc), one line per split (train, val)."""

    metrics = list(dict.fromkeys(k.split("/", 1)[1] for k in CURVE_KEYS))
    splits = list(dict.fromkeys(k.split("/", 1)[0] for k in CURVE_KEYS))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    epochs = [r["epoch"] for r in rows]
    for ax, metric in zip(axes[0], metrics):
        for split, style in zip(splits, ("-o", "--s", ":^")):
            key = f"{split}/{metric}"
            ax.plot(epochs, [r.get(key, np.nan) for r in rows], style, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def per_class_table(matrix: np.ndarray) -> dict[str, list]:
    """Test accuracy per digit (the confusion matrix's recall), its count and the digit it is most mistaken
    for: one table in MLflow instead of ten single-point metric charts."""
    from mnistlab.callbacks import clean_float

    support = matrix.sum(axis=1)
    off = matrix.astype(float).copy()
    np.fill_diagonal(off, -1)
    return {
        "digit": list(range(matrix.shape[0])),
        "test/acc": [clean_float(np.float32(matrix[d, d] / s)) if s else None for d, s in enumerate(support)],
        "count": [int(s) for s in support],
        "most_mistaken_for": [int(off[d].argmax()) for d in range(matrix.shape[0])],
    }


def confusion_figure(metric, value, title: str = "test confusion matrix"):
    """torchmetrics' own plot of a MulticlassConfusionMatrix (counts in the cells, true vs predicted class),
    with text small enough for 4-digit counts. `value` is its computed matrix: computing again here would be a
    DDP collective that only rank 0 reaches."""
    fig, ax = metric.plot(val=value, cmap="Blues")
    for text in ax.texts:
        text.set_fontsize(8)
    ax.set_title(title)
    fig.set_size_inches(6, 5.5)
    return fig


def misclassified_figure(images: torch.Tensor, predicted: torch.Tensor, true: torch.Tensor, max_images: int = 64):
    """A grid (torchvision make_grid) of wrong test digits, each captioned predicted/true."""
    wrong = (predicted != true).nonzero().flatten()[:max_images]
    nrow = 8
    fig, ax = plt.subplots(figsize=(8, 8))
    ax.axis("off")
    if wrong.numel() == 0:
        ax.set_title("no misclassified test digits")
        return fig
    imgs = images[wrong].reshape(-1, 1, 28, 28).float().cpu()
    pad = 2
    grid = make_grid(imgs, nrow=nrow, padding=pad, pad_value=1.0)
    ax.imshow(grid[0].numpy(), cmap="gray_r")
    cell = 28 + pad
    for k, idx in enumerate(wrong.tolist()):
        r, c = divmod(k, nrow)
        ax.text(c * cell + pad, r * cell + pad + 6, f"{int(predicted[idx])}/{int(true[idx])}",
                color="red", fontsize=8, fontweight="bold")
    ax.set_title(f"misclassified test digits (predicted/true), {wrong.numel()} shown")
    fig.tight_layout()
    return fig
