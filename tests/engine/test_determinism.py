"""SEED makes CPU training reproducible: same seed, same losses (loader workers included);
another seed, other losses. The data stream is a pure function of (seed, iteration, rank)."""

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog

import san_det  # noqa: F401
from san_det.detection import DetectionTrainer
from san_det.engine.loader import DeterministicBatchStream, ResumableTrainLoader
from tests.helpers.coco_files import register_coco_dataset, simple_images
from tests.helpers.tiny_detection import tiny_retinanet_cfg


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    register_coco_dataset("det_train", str(root / "data"), simple_images(6, seed=2))
    return root


def _losses(root, name, seed, workers, iters=4):
    cfg = tiny_retinanet_cfg(str(root / name), ("det_train",), max_iter=iters)
    cfg.SEED = seed
    cfg.DATALOADER.NUM_WORKERS = workers
    trainer = DetectionTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return [v for v, _ in trainer.storage.history("total_loss").values()]


@pytest.mark.slow
def test_same_seed_same_losses_with_and_without_workers(dataset):
    first = _losses(dataset, "a", seed=11, workers=2)
    again = _losses(dataset, "b", seed=11, workers=2)
    no_workers = _losses(dataset, "c", seed=11, workers=0)
    other = _losses(dataset, "d", seed=12, workers=2)
    assert len(first) == 4
    assert first == again  # bit for bit
    assert first == no_workers
    assert first != other and all(np.isfinite(other))


def _plain_stream(n=7, batch=2, **kwargs):
    dicts = [{"i": i, "width": 10 + (i % 3 == 0) * 10, "height": 15} for i in range(n)]
    return DeterministicBatchStream(dicts, lambda d: d["i"], batch, seed=3, **kwargs)


def _batches(stream, count):
    out = []
    for _, plan in stream.batch_plans():
        out.append([stream.load(p, idx) for p, idx in plan])
        if len(out) == count:
            return out


def test_two_ranks_together_see_what_one_rank_sees():
    one = _batches(_plain_stream(batch=4, rank=0, world_size=1), 5)
    r0 = _batches(_plain_stream(batch=2, rank=0, world_size=2), 5)
    r1 = _batches(_plain_stream(batch=2, rank=1, world_size=2), 5)
    for whole, a, b in zip(one, r0, r1):
        assert sorted(whole) == sorted(a + b)
    # Every epoch is a permutation of the dataset, and epochs differ.
    flat = [i for b in one for i in b]
    assert sorted(flat[:7]) == list(range(7)) and sorted(flat[7:14]) == list(range(7))
    assert flat[:7] != flat[7:14]


@pytest.mark.parametrize("grouping", [False, True])
def test_stream_started_later_continues_the_same_batches(grouping):
    full = _batches(_plain_stream(aspect_ratio_grouping=grouping), 9)
    later = _batches(_plain_stream(aspect_ratio_grouping=grouping, start_iter=5), 4)
    assert later == full[5:]
    if grouping:  # batches hold one orientation only (image i is landscape iff i % 3 == 0)
        assert all(len({i % 3 == 0 for i in b}) == 1 for b in full)


def test_augmentation_randomness_depends_on_position_only():
    def mapper(d):
        return (d["i"], float(np.random.rand()))

    dicts = [{"i": i} for i in range(5)]
    a = DeterministicBatchStream(dicts, mapper, 2, seed=1, rank=0, world_size=1)
    b = DeterministicBatchStream(dicts, mapper, 2, seed=1, rank=0, world_size=1)
    np.random.seed(123)  # the global state before must not matter ...
    x = [a.load(p, a.index_at(p)) for p in range(8)]
    np.random.seed(456)
    y = [b.load(p, b.index_at(p)) for p in reversed(range(8))][::-1]  # ... nor the order
    assert x == y
    state = np.random.get_state()[1].copy()
    a.load(0, 0)
    assert (np.random.get_state()[1] == state).all()  # and the global state is restored


def test_skipped_images_are_replaced_deterministically():
    dicts = [{"i": i} for i in range(4)]
    stream = DeterministicBatchStream(
        dicts,
        lambda d: None if d["i"] == 2 else d["i"],
        1,
        seed=0,
        shuffle=False,
        rank=0,
        world_size=1,
    )
    assert [stream.load(p, stream.index_at(p)) for p in range(4)] == [0, 1, 3, 3]
    dead = DeterministicBatchStream(dicts, lambda d: None, 1, seed=0, rank=0, world_size=1)
    with pytest.raises(RuntimeError, match="none of the 4 training images"):
        dead.load(0, 0)


def _epoch_order(seed, n, epoch=0):
    """The shuffled order of an epoch, restated: ``torch.randperm`` seeded with NumPy's
    ``SeedSequence([seed, 1 (the epoch stream), epoch])`` (31 bits)."""
    state = int(np.random.SeedSequence([seed, 1, epoch]).generate_state(1)[0]) >> 1
    return torch.randperm(n, generator=torch.Generator().manual_seed(state)).tolist()


def _first_from_iterators(stream):
    """The first batch as ``__iter__`` and as :class:`ResumableTrainLoader` give it."""
    return next(iter(stream)), next(iter(ResumableTrainLoader(stream)))


def test_a_fresh_stream_starts_with_the_first_batch():
    """Position 0 onwards, exactly: the dataset order without shuffling, epoch 0's order with it;
    rank r of W takes positions r, r + W, ..."""
    plain = _plain_stream(n=7, batch=3, shuffle=False, rank=0, world_size=1)
    assert _batches(plain, 3) == [[0, 1, 2], [3, 4, 5], [6, 0, 1]]
    assert _first_from_iterators(plain) == ([0, 1, 2], [0, 1, 2])
    order = _epoch_order(3, 7)
    shuffled = _plain_stream(n=7, batch=3, rank=0, world_size=1)
    assert order != list(range(7))
    assert _batches(shuffled, 2) == [order[:3], order[3:6]]
    assert _first_from_iterators(shuffled) == (order[:3], order[:3])
    with_workers = iter(ResumableTrainLoader(shuffled, num_workers=2))  # batches round-robin
    second_epoch = _epoch_order(3, 7, epoch=1)
    expected = [order[:3], order[3:6], [order[6]] + second_epoch[:2]]
    assert [next(with_workers) for _ in range(3)] == expected
    rank1 = _plain_stream(n=7, batch=2, rank=1, world_size=2)
    assert _first_from_iterators(rank1) == ([order[1], order[3]], [order[1], order[3]])
    grouped = _plain_stream(n=7, batch=2, rank=0, world_size=1, aspect_ratio_grouping=True)
    landscape = [i for i in order if i % 3 == 0]  # image i is landscape iff i % 3 == 0
    portrait = [i for i in order if i % 3 != 0]
    landscape_first = order.index(landscape[1]) < order.index(portrait[1])
    first_full = landscape[:2] if landscape_first else portrait[:2]
    assert _first_from_iterators(grouped) == (first_full, first_full)


def test_a_fresh_training_run_trains_on_the_first_batch(dataset):
    """The images the model gets in iteration 0 of a new run: epoch 0's first IMS_PER_BATCH."""
    cfg = tiny_retinanet_cfg(str(dataset / "first"), ("det_train",), max_iter=2)
    cfg.SEED = 5
    trainer = DetectionTrainer(cfg)
    trainer.resume_or_load(resume=False)
    seen = []
    trainer.model.register_forward_pre_hook(
        lambda _m, args: seen.append([d["image_id"] for d in args[0]])
    )
    trainer.train()
    ids = [d["image_id"] for d in DatasetCatalog.get("det_train")]
    order = _epoch_order(5, len(ids))
    assert seen == [[ids[i] for i in order[:2]], [ids[i] for i in order[2:4]]]
