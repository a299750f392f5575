"""Device-resident MNIST batches for Lightning: one copy per split on the trainer's device, batches by index slicing."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch

from mnistlab.data.preprocess import load_processed, unsplit

PIXEL_MAX = 255.0


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of one epoch: a CPU generator seeded by (seed, epoch), so the order is the same on CPU and
    GPU, after a resume, and for a stacked member of the same seed (stacked/nets.py)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


class DeviceBatches:
    """Iterable of (x, y) batches sliced from tensors already on the device.

    Hand-written instead of DataLoader(TensorDataset): the loader collates per sample in Python and
    copies host->device every step, which costs more than the MLP's own step on MNIST.
    The permutation comes from a CPU generator seeded by (seed, epoch), so the batch order is the same
    on CPU and GPU and after a resume; under DDP each rank takes its strided shard.
    """

    def __init__(self, x, y, batch_size, shuffle, seed=0, epoch_fn=None, rank=0, world_size=1):
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.seed, self.epoch_fn, self.rank, self.world_size = seed, epoch_fn or (lambda: 0), rank, world_size

    def _indices(self) -> torch.Tensor:
        n = self.y.shape[0]
        if self.shuffle:
            idx = epoch_permutation(n, self.seed, int(self.epoch_fn()))
        else:
            idx = torch.arange(n)
        return idx[self.rank :: self.world_size].to(self.y.device)

    def __len__(self) -> int:
        n = len(range(self.rank, self.y.shape[0], self.world_size))
        return (n + self.batch_size - 1) // self.batch_size

    # rows gathered per index_select: whole batches, ~1k rows (~3 MB of float images, still in the CPU's cache when
    # their steps read them). One epoch's gathers alone, 2 cores: 13-19 ms in 1k-row chunks, 25-45 ms in 8k-row chunks.
    CHUNK_ROWS = 1024

    def __iter__(self):
        # The batches are gathered a chunk of batches at a time (one index_select per 8 batches of 128), then
        # sliced as views: the same rows in the same order as x[idx[batch]] per batch, but one op instead of 8.
        # A gather per batch (x[sel], and worse under deterministic algorithms) cost ~0.3-1 ms per step on 2 CPU
        # cores, more than the framework's own per-step work; a whole-epoch copy would cost a second copy of the split.
        idx = self._indices()
        chunk = self.batch_size * max(1, self.CHUNK_ROWS // self.batch_size)
        for c0 in range(0, idx.shape[0], chunk):
            sel = idx[c0 : c0 + chunk]
            xc, yc = self.x.index_select(0, sel), self.y.index_select(0, sel)
            for start in range(0, sel.shape[0], self.batch_size):
                yield xc[start : start + self.batch_size], yc[start : start + self.batch_size]


class MnistDataModule(pl.LightningDataModule):
    """Loads data/processed once and keeps each split, flattened and scaled to [0, 1], on the trainer's device.

    validation=False trains on train + val (all training images, in the raw file's order, so a seed gives the
    same batches whatever the preprocess split) and has no val split; the trainer must then skip validation.
    """

    def __init__(self, processed_dir: Path, batch_size: int, eval_batch_size: int, seed: int, validation: bool = True):
        super().__init__()
        self.processed_dir, self.batch_size, self.eval_batch_size, self.seed, self.validation = (
            Path(processed_dir), batch_size, eval_batch_size, seed, validation,
        )
        self.meta: dict = {}
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def load(self) -> dict:
        """Read meta.json (and fail early with the fix when data/processed is missing)."""
        if not self.meta:
            self._arrays, self.meta = load_processed(self.processed_dir)
            if not self.validation:
                val = self._arrays.pop("val")
                self._arrays["train"] = unsplit(self._arrays["train"], val, self.meta["val_size"], self.meta["split_seed"])
        return self.meta

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def setup(self, stage: str | None = None) -> None:
        self.load()
        device = self._device()
        if self._splits and next(iter(self._splits.values()))[0].device == device:
            return
        for name, (x, y) in self._arrays.items():
            xt = torch.from_numpy(x).to(device).reshape(x.shape[0], -1).float().div_(PIXEL_MAX)
            self._splits[name] = (xt, torch.from_numpy(y).to(device).long())

    def _batches(self, split: str, batch_size: int, shuffle: bool) -> DeviceBatches:
        x, y = self._splits[split]
        t = self.trainer
        return DeviceBatches(
            x, y, batch_size, shuffle, seed=self.seed,
            epoch_fn=(lambda: t.current_epoch) if t is not None else None,
            rank=t.global_rank if t is not None else 0,
            world_size=t.world_size if t is not None else 1,
        )

    def train_dataloader(self):
        # trainer.overfit_batches: the same few batches every epoch (Lightning turns a DataLoader's shuffling off)
        overfit = self.trainer is not None and self.trainer.overfit_batches > 0
        return self._batches("train", self.batch_size, shuffle=not overfit)

    def val_dataloader(self):
        return self._batches("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self):
        return self._batches("test", self.eval_batch_size, shuffle=False)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """DeviceBatches' tensors are on the device already: returned as they are. Lightning's default walks the batch
        with apply_to_collection on every step (~8 % of its per-step loop work here, py-spy; benchmarks/README.md)."""
        if all(t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._splits[name]
