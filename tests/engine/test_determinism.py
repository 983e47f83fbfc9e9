"""SEED makes CPU training reproducible: same seed, same losses (loader workers included);
another seed, other losses. The data stream is a pure function of (seed, iteration, rank)."""

import numpy as np
import pytest

import san_det  # noqa: F401
from san_det.detection import DetectionTrainer
from san_det.engine.loader import DeterministicBatchStream
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
