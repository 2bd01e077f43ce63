"""The resumable sampler: one rank's share of a seeded order per epoch, and a DataLoader that saves it.

Together they make a DDP run read what one process with the doubled batch reads, and a resumed run
continue at the first sample it had not trained on (``ckpt_path``), mid-epoch.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSampler(Sampler[tuple[int, int]]):
    """One rank's share of a seeded permutation per epoch, resumable mid-epoch.

    Epoch e's order is ``randperm(num_samples)`` seeded with ``seed + e`` (without ``shuffle``: 0..n-1),
    the same for every world size, cut to a multiple of ``world_size``; rank r reads ``order[r::world_size]``
    as DistributedSampler does. So batch k of size B on each of W ranks holds exactly the samples of
    batch k of size W·B in one process — what makes a DDP run equal to one process with the doubled
    batch. (Lightning's own DistributedSampler would shuffle with another generator than the one-process
    RandomSampler, so the two would see different data.)

    ``weights`` (one per sample, None: uniform): epoch e instead draws ``num_samples`` indices with replacement,
    in proportion to the weights, from a generator seeded with ``seed + e``; a training mix that balances a
    column's values (``ImageTextDataModule(balance_by=...)``) with the same resume and DDP guarantees.

    Yields (epoch, index): ``ImageTextDataset`` keys a row's flip and crop by the epoch.
    ``consumed``: samples of this epoch that reached the training step (counted by the datamodule, not
    by ``__iter__``, because Lightning fetches a batch ahead). ``state_dict`` is (epoch, consumed); after
    ``load_state_dict`` the next ``__iter__`` starts at the first sample not yet trained on.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        weights: list[float] | None = None,
    ) -> None:
        if weights is not None and (len(weights) != num_samples or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(
                f"EpochSampler: weights must be {num_samples} non-negative numbers, not all zero (got {len(weights)})"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"EpochSampler: rank {rank} is outside world_size {world_size}")
        if num_samples < world_size:
            raise ValueError(f"EpochSampler: {num_samples} training rows cannot be shared by {world_size} processes")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        self.epoch = 0
        self.consumed = 0

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``, in training order."""
        if self.weights is not None:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        elif self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.num_samples)
        return order[: len(self) * self.world_size][self.rank :: self.world_size].tolist()

    def __iter__(self):
        epoch = self.epoch
        for index in self.order(epoch)[self.consumed :]:
            yield epoch, index

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch; a new epoch starts from its first sample."""
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "num_samples": self.num_samples,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["num_samples"], state["world_size"]) != (self.num_samples, self.world_size):
            raise ValueError(
                f"ckpt_path: the checkpoint was written with {state['num_samples']} training rows on {state['world_size']} "
                f"process(es), this run has {self.num_samples} on {self.world_size}: the data order cannot be resumed mid-epoch"
            )
        self.epoch, self.consumed = state["epoch"], state["consumed"]
        if self.consumed >= len(self):
            # Saved after the epoch's last batch: Lightning resumes with the next epoch.
            self.epoch, self.consumed = self.epoch + 1, 0


class ResumableDataLoader(DataLoader):
    """A DataLoader over an ``EpochSampler`` with its ``state_dict``: Lightning saves it in every checkpoint
    (the fit loop's ``combined_loader`` state) and loads it back on ``ckpt_path=...``, before the first
    batch, so a run resumed mid-epoch goes on with the next batch of the same order."""

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
