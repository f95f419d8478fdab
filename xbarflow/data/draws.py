"""Which training image a step reads, and with which random augmentation.

Both are functions of ``(seed, epoch, position in the epoch)`` only, so a run stopped anywhere,
mid-epoch included, and resumed from its checkpoint reads exactly the batches, augmented
exactly as, the uninterrupted run would have:

- :class:`EpochShuffleSampler` shuffles per ``(seed, epoch)`` and yields *draw keys*
  ``epoch * n + i`` (``i``: the image's index); :meth:`~EpochShuffleSampler.resume_at` makes
  the next pass over a given epoch start after the images already drawn in it.
- :class:`SeededDraws` reads the training split by draw key: image ``key % n``, with the
  global CPU generator (which torchvision's random transforms draw from) seeded from
  ``(seed, key)`` for that one read and restored afterwards. Without it a random crop or flip
  took whatever state the generator had reached, which a resumed process does not reproduce,
  nor does a change of ``num_workers``.

- :class:`ResumableLoader`, the training ``DataLoader``, counts the batches it has handed out
  in the current epoch and has ``state_dict`` / ``load_state_dict``: Lightning stores that
  position in every checkpoint and gives it back on resume, before the first batch is read
  (the interface Lightning asks of a loader to resume mid-epoch). Nothing here imports Lightning.
"""
from __future__ import annotations

import warnings
from typing import Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

_MASK64 = (1 << 64) - 1


def draw_seed(seed: int, key: int) -> int:
    """A 64-bit seed for draw ``key`` of a run with ``seed``: splitmix64 of the pair, so
    neighbouring keys (and runs) get unrelated generator states."""
    z = ((int(seed) & 0xFFFFFFFF) << 40 ^ int(key)) & _MASK64
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class EpochShuffleSampler(Sampler[int]):
    """A shuffle of ``n`` training images that depends only on ``(seed, epoch)``, yielding
    draw keys ``epoch * n + i`` (read them through :class:`SeededDraws`).

    Lightning calls :meth:`set_epoch` before each epoch; the permutation is drawn when the
    epoch's first batch is read. ``len`` stays ``n`` after :meth:`resume_at` (Lightning counts
    the batches of a resumed epoch from its restored progress).
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = int(n), int(seed), 0
        self._resume: Optional[Tuple[int, int]] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, drawn: int) -> None:
        """The next pass over ``epoch`` skips the first ``drawn`` images of its permutation (those
        the interrupted run had trained on). Passes over other epochs are unaffected; a position
        at or past the epoch's end means the epoch was finished."""
        self._resume = (int(epoch), max(0, int(drawn)))

    def pending_skip(self, epoch: int) -> int:
        """Images the next pass over ``epoch`` skips (:meth:`resume_at`), else 0."""
        return self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen)
        if self._resume is not None and self._resume[0] == self.epoch:
            order = order[self._resume[1]:]
            self._resume = None  # consumed; a pass over another epoch leaves it (it never matches again)
        return iter((order + self.epoch * self.n).tolist())


class SeededDraws(Dataset):
    """The training split read by draw key (:class:`EpochShuffleSampler`): item ``key % n``.

    Unless the split is a plain ``TensorDataset`` (no randomness in a read), each read runs
    with the global CPU generator seeded by :func:`draw_seed` ``(seed, key)`` and restores
    its state afterwards: a random augmentation depends on the draw, not on what ran before
    it in this process or worker. ``torch.default_generator`` is seeded directly:
    ``torch.manual_seed`` would also seed every accelerator (~0.3 ms a call).
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)
        self.n = len(dataset)  # type: ignore[arg-type]
        self.random_reads = not isinstance(dataset, TensorDataset)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int):
        if not self.random_reads:
            return self.dataset[key % self.n]
        gen = torch.default_generator
        state = gen.get_state()
        gen.manual_seed(draw_seed(self.seed, key))
        try:
            return self.dataset[key % self.n]
        finally:
            gen.set_state(state)


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` over an :class:`EpochShuffleSampler` whose place in the epoch can
    be saved and restored (``state_dict`` / ``load_state_dict``, the stateful-loader interface).

    The state is ``{"epoch", "batches", "images_per_batch"}``: the batches handed out so far in
    the epoch being read, and the images they took from the permutation (this process's batch
    size times the number of processes). Lightning reads a batch only when a step needs it
    (no look-ahead when the loader has a length), so when a checkpoint is written at a batch's
    end, ``batches`` counts exactly the steps taken in the epoch. :meth:`load_state_dict` makes
    the sampler's next pass over that epoch skip them; a position saved at an epoch's end
    skips nothing, as the resumed run starts the next epoch.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._position = (0, 0)  # (epoch, batches handed out in it)

    def __iter__(self):
        return self._counted()

    def _epoch_sampler(self) -> Optional[EpochShuffleSampler]:
        # None where a distributed run has wrapped the sampler (DistributedSampler over it)
        return self.sampler if isinstance(self.sampler, EpochShuffleSampler) else None

    def _draw_sampler(self) -> Optional[EpochShuffleSampler]:
        """The sampler of draw keys, also inside Lightning's distributed wrapper (which forwards
        ``set_epoch`` to it): the epoch a position belongs to."""
        sampler = self._epoch_sampler()
        if sampler is None:  # DistributedSamplerWrapper(_DatasetSamplerWrapper(sampler))
            sampler = getattr(getattr(self.sampler, "dataset", None), "_sampler", None)
        return sampler if isinstance(sampler, EpochShuffleSampler) else None

    def _counted(self):
        # runs at the first batch, after Lightning's set_epoch (the iterator is made before it);
        # a wrapped sampler never has a skip pending (load_state_dict sets none there)
        sampler = self._draw_sampler()
        epoch = sampler.epoch if sampler is not None else 0
        skip = sampler.pending_skip(epoch) if sampler is not None else 0
        self._position = (epoch, skip // self._images_per_batch())
        for batch in super().__iter__():
            self._position = (epoch, self._position[1] + 1)
            yield batch

    def _images_per_batch(self) -> int:
        world = torch.distributed.get_world_size() if torch.distributed.is_available() and \
            torch.distributed.is_initialized() else 1
        return int(self.batch_size) * world

    def state_dict(self) -> dict:
        epoch, batches = self._position
        return {"epoch": epoch, "batches": batches, "images_per_batch": self._images_per_batch()}

    def load_state_dict(self, state_dict: dict) -> None:
        sampler = self._epoch_sampler()
        if sampler is None:
            # wrapped for a distributed run: its shards are not skipped into, so only a position
            # within an epoch loses anything (one saved at an epoch's end, or before its first
            # batch, resumes exactly)
            if 0 < state_dict["batches"] < len(self):
                warnings.warn("resuming mid-epoch with a distributed sampler: the epoch's remaining batches are "
                              "drawn anew, not those the interrupted run would have read", RuntimeWarning,
                              stacklevel=2)
            return
        sampler.resume_at(state_dict["epoch"], state_dict["batches"] * state_dict["images_per_batch"])
