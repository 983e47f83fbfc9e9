"""A training data stream that is a pure function of (seed, iteration): resumable, reproducible.

detectron2's ``TrainingSampler`` restarts its shuffled stream from the beginning when training
resumes, and random augmentations depend on each loader worker's RNG history. Here the batch of
iteration ``i`` on rank ``r`` depends on nothing but the seed, ``i``, ``r`` and the world size:

- Stream positions: the global stream ``0, 1, 2, ...`` is dealt to ranks as detectron2 does (rank
  ``r`` takes positions ``r, r + W, r + 2W, ...``); position ``p`` reads image
  ``perm(p // N)[p % N]``, where ``perm(e)`` is the shuffled order of epoch ``e`` (a fixed function
  of the seed), ``N`` the dataset size.
- Augmentation: each sample is mapped with Python's, NumPy's and torch's global RNGs seeded from
  ``(seed, p)`` (and restored afterwards), so its random crop/flip does not depend on which worker
  maps it or what ran before.
- Resuming at iteration ``i`` starts the stream at ``i``'s batch
  (:meth:`ResumableTrainLoader.set_start_iter`).
- Data-loader workers take batches round-robin; torch's ``DataLoader`` returns them in order.
- An image the mapper skips (returns None: unreadable, with ``DATALOADER.SKIP_CORRUPT_IMAGES``) is
  replaced by the next image of the dataset, also deterministically.

So one process with batch ``2b`` sees exactly the samples two processes with batch ``b`` see
together, in every iteration. With ``ASPECT_RATIO_GROUPING``, batches group images of the same
orientation (landscape or not) as detectron2 does; the grouping is replayed from the stream's
start (cheap: only indices), so resuming is exact too.
"""

import logging
import random
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .stop_signals import shielded_worker_init

__all__ = ["DeterministicBatchStream", "ResumableTrainLoader", "mix_seed", "seeded_rng"]

logger = logging.getLogger(__name__)

_EPOCH_STREAM, _SAMPLE_STREAM = 1, 2  # trainer.py seeds steps with stream 3


def mix_seed(*values: int) -> int:
    """A well-mixed 31-bit seed from non-negative integers (NumPy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0] >> 1)


@contextmanager
def seeded_rng(seed: int):
    """Seed Python's, NumPy's and torch's (CPU) global RNGs; restore their states on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def _identity(batch):
    return batch


class DeterministicBatchStream(IterableDataset):
    """Infinite stream of per-rank batches (lists of mapped dicts), see the module docstring.

    Args:
        dataset: list of dataset dicts (or a ``DatasetFromList``).
        mapper: dict -> model input dict, or None to skip the image.
        batch_size: images per batch on this rank.
        seed: non-negative seed; must be equal on every rank.
        rank, world_size: this process and the number of processes (default: from ``comm``).
        shuffle: shuffle each epoch (else dataset order).
        aspect_ratio_grouping: batch landscape (``width > height``) and other images apart;
            needs ``width``/``height`` in every dict.
        start_iter: the first batch produced is that of this iteration.
    """

    def __init__(
        self,
        dataset,
        mapper: Callable,
        batch_size: int,
        *,
        seed: int,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        shuffle: bool = True,
        aspect_ratio_grouping: bool = False,
        start_iter: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if len(dataset) == 0:
            raise ValueError("the training set is empty")
        self._dicts = dataset if isinstance(dataset, DatasetFromList) else None
        if self._dicts is None:
            groups = self._aspect_groups(dataset) if aspect_ratio_grouping else None
            self._dicts = DatasetFromList(list(dataset), copy=False, serialize=True)
        else:
            groups = None
            if aspect_ratio_grouping:
                groups = self._aspect_groups([dataset[i] for i in range(len(dataset))])
        self.group_of = groups  # np.ndarray of 0/1 per image, or None
        self.mapper = mapper
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = comm.get_rank() if rank is None else rank
        self.world_size = comm.get_world_size() if world_size is None else world_size
        self.shuffle = shuffle
        self.start_iter = start_iter
        self._perm_cache: Tuple[int, Optional[List[int]]] = (-1, None)

    @staticmethod
    def _aspect_groups(dicts) -> Optional[np.ndarray]:
        if not all("width" in d and "height" in d for d in dicts):
            logger.warning("ASPECT_RATIO_GROUPING needs width/height in every dict; not grouping")
            return None
        return np.array([0 if d["width"] > d["height"] else 1 for d in dicts], dtype=np.int8)

    @property
    def num_images(self) -> int:
        """Number of images in the dataset the stream draws from."""
        return len(self._dicts)

    def __len__(self):  # for DataLoader's length heuristics only: the stream is infinite
        raise TypeError("DeterministicBatchStream is infinite")

    # ------------------------------------------------------------------------------- the plan
    def index_at(self, position: int) -> int:
        """Dataset index read at global stream ``position``."""
        n = len(self._dicts)
        epoch, offset = divmod(position, n)
        if not self.shuffle:
            return offset
        if self._perm_cache[0] != epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, _EPOCH_STREAM, epoch))
            self._perm_cache = (epoch, torch.randperm(n, generator=g).tolist())
        return self._perm_cache[1][offset]

    def _rank_positions(self, start: int = 0) -> Iterator[int]:
        j = start
        while True:
            yield j * self.world_size + self.rank
            j += 1

    def batch_plans(self) -> Iterator[Tuple[int, List[Tuple[int, int]]]]:
        """``(iteration, [(position, dataset index), ...])`` from ``start_iter`` on."""
        b = self.batch_size
        if self.group_of is None:
            it = self.start_iter
            while True:
                positions = range(it * b * self.world_size + self.rank,
                                  (it + 1) * b * self.world_size, self.world_size)
                yield it, [(p, self.index_at(p)) for p in positions]
                it += 1
        buckets: Sequence[List[Tuple[int, int]]] = ([], [])
        it = 0
        for p in self._rank_positions():
            idx = self.index_at(p)
            bucket = buckets[int(self.group_of[idx])]
            bucket.append((p, idx))
            if len(bucket) == b:
                if it >= self.start_iter:
                    yield it, list(bucket)
                bucket.clear()
                it += 1

    # ---------------------------------------------------------------------------- the samples
    def load(self, position: int, index: int):
        """Map dataset image ``index`` for stream ``position`` (next readable image if skipped)."""
        n = len(self._dicts)
        for attempt in range(n):
            current = (index + attempt) % n
            with seeded_rng(mix_seed(self.seed, _SAMPLE_STREAM, position, attempt)):
                out = self.mapper(self._dicts[current])
            if out is not None:
                return out
        raise RuntimeError(f"none of the {n} training images could be read (all were skipped)")

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k, (_, plan) in enumerate(self.batch_plans()):
            if k % workers == worker:
                yield [self.load(p, idx) for p, idx in plan]


class ResumableTrainLoader:
    """Iterable over training batches of a :class:`DeterministicBatchStream`, started lazily.

    ``iter(loader)`` returns an iterator that creates its ``DataLoader`` (and worker processes)
    at the first ``next``; a trainer creates the iterator when it is built and resumes later, so
    :meth:`set_start_iter` (and :attr:`seed`) may change until the first batch is taken.
    """

    def __init__(self, stream: DeterministicBatchStream, num_workers: int = 0):
        self.stream = stream
        self.num_workers = int(num_workers)

    @property
    def seed(self) -> int:
        return self.stream.seed

    @seed.setter
    def seed(self, value: int) -> None:
        self.stream.seed = int(value)

    def set_start_iter(self, start_iter: int) -> None:
        self.stream.start_iter = int(start_iter)

    def __iter__(self):
        return _LazyIterator(self)

    def make_iterator(self):
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            persistent_workers=False,
            # a stop signal to the whole process group is the main process's to handle
            worker_init_fn=shielded_worker_init(),
        )
        return iter(loader)


class _LazyIterator:
    def __init__(self, owner: ResumableTrainLoader):
        self._owner = owner
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            logger.info(
                f"Training data stream: seed {self._owner.seed}, starting at iteration "
                f"{self._owner.stream.start_iter}, {self._owner.num_workers} loader workers"
            )
            self._it = self._owner.make_iterator()
        return next(self._it)
