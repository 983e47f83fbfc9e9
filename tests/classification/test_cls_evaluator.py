"""Top-1 / top-5 evaluator: exact counts, distributed gathering, robustness variants."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import san_det  # noqa: F401  (before detectron2, also in the spawned workers)
from detectron2.data.samplers import InferenceSampler  # noqa: E402

from san_det.classification.evaluator import (
    ClassificationEvaluator,
    VariantLoader,
    apply_variant,
)


def _fake_predictions(n=103, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits[: n // 2, :] -= 5.0
    logits[torch.arange(n // 2), labels[: n // 2]] += 10.0  # half of them certainly right
    inputs = [{"label": int(labels[i]), "image_id": i} for i in range(n)]
    outputs = [{"logits": logits[i]} for i in range(n)]
    return inputs, outputs, logits.numpy(), labels.numpy()


def _reference(logits, labels, k):
    order = np.argsort(-logits, axis=1)[:, :k]
    return 100.0 * np.mean([labels[i] in order[i] for i in range(len(labels))])


def _evaluate(evaluator, inputs, outputs, batch=10):
    evaluator.reset()
    for i in range(0, len(inputs), batch):
        evaluator.process(inputs[i : i + batch], outputs[i : i + batch])
    return evaluator.evaluate()


def test_topk_against_numpy():
    inputs, outputs, logits, labels = _fake_predictions()
    res = _evaluate(ClassificationEvaluator("fake", topk=(1, 3, 5)), inputs, outputs)
    r = res["classification"]
    for k in (1, 3, 5):
        assert r[f"top{k}"] == pytest.approx(_reference(logits, labels, k), abs=1e-9)
    assert r["num_images"] == 103
    per_class = [np.mean(logits[labels == c].argmax(1) == c) for c in np.unique(labels)]
    assert r["mean_class_top1"] == pytest.approx(100.0 * np.mean(per_class))
    assert 50.0 <= r["top1"] < 100.0


def test_topk_at_and_beyond_the_class_count():
    """k = C - 1, C, C + 1 and 3C with C = 7 classes: an image counts for k iff fewer than k
    logits exceed its label's (so every image for k >= C), counted exactly."""
    inputs, outputs, logits, labels = _fake_predictions(n=60, classes=7, seed=3)
    ranks = (logits > logits[np.arange(60), labels][:, None]).sum(axis=1)
    assert 0 < (ranks == 6).sum() < 60  # some labels have the smallest logit
    topk = (1, 6, 7, 8, 21)
    r = _evaluate(ClassificationEvaluator("fake", topk=topk), inputs, outputs)["classification"]
    for k in topk:
        assert r[f"top{k}"] == 100.0 * int((ranks < k).sum()) / 60, k
    assert r["top7"] == r["top8"] == r["top21"] == 100.0 and r["top6"] < 100.0


def test_evaluator_errors():
    inputs, outputs, _, _ = _fake_predictions(n=4)
    ev = ClassificationEvaluator("fake")
    with pytest.raises(ValueError, match="outside"):
        ev.process([dict(inputs[0], label=9)], outputs[:1])
    ev.reset()
    ev.process(inputs[:2], outputs[:2])
    ev.process(inputs[:1], outputs[:1])  # an image seen twice
    with pytest.raises(RuntimeError, match="more than once"):
        ev.evaluate()
    with pytest.raises(ValueError, match="topk"):
        ClassificationEvaluator(topk=(0,))


def _worker(rank, world, port, result_file):
    os.environ["OMP_NUM_THREADS"] = "1"
    url = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world)
    inputs, outputs, _, _ = _fake_predictions()
    mine = list(InferenceSampler(len(inputs)))  # this rank's share, as in evaluation
    ev = ClassificationEvaluator("fake", topk=(1, 5))
    res = _evaluate(ev, [inputs[i] for i in mine], [outputs[i] for i in mine], batch=7)
    if rank == 0:
        torch.save(res, result_file)
    else:
        assert res == {}
    dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_evaluation_equals_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result_file = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, port, result_file), nprocs=2, join=True)
    gathered = torch.load(result_file, weights_only=False)
    inputs, outputs, _, _ = _fake_predictions()
    single = _evaluate(ClassificationEvaluator("fake", distributed=False), inputs, outputs)
    assert gathered["classification"]["num_images"] == 103
    assert gathered == single


def test_robustness_variants():
    x = torch.arange(2 * 3 * 3).view(2, 3, 3)
    a = x.numpy()
    np.testing.assert_array_equal(apply_variant(x, "rot90").numpy(), np.rot90(a, 1, axes=(1, 2)))
    np.testing.assert_array_equal(apply_variant(x, "rot180").numpy(), a[:, ::-1, ::-1])
    np.testing.assert_array_equal(apply_variant(x, "rot270").numpy(), np.rot90(a, 3, axes=(1, 2)))
    np.testing.assert_array_equal(apply_variant(x, "vflip").numpy(), a[:, ::-1, :])
    np.testing.assert_array_equal(apply_variant(x, "hflip").numpy(), a[:, :, ::-1])
    # The top-left pixel goes to the bottom-left corner under a 90-degree counter-clockwise turn.
    assert apply_variant(x, "rot90")[0, 2, 0] == x[0, 0, 0]
    with pytest.raises(ValueError, match="unknown robustness variant 'rot45'.*valid"):
        apply_variant(x, "rot45")
    loader = [[{"image": x, "label": 1}], [{"image": x + 1, "label": 2}]]
    wrapped = VariantLoader(loader, "vflip")
    assert len(wrapped) == 2
    batches = list(wrapped)
    assert torch.equal(batches[1][0]["image"], torch.flip(x + 1, dims=(1,)))
    assert batches[1][0]["label"] == 2 and torch.equal(loader[0][0]["image"], x)
