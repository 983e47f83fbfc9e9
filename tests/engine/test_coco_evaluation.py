"""COCO evaluation without detectron2's ``_C``: faster-coco-eval stands in for ``COCOeval_opt``
and gives pycocotools' numbers (all 12 and per class); pycocotools is the fallback."""

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import san_det  # noqa: F401  (patches detectron2)
from san_det import compat
from san_det.detection import build_coco_evaluator
from tests.helpers.scripts import child_env
from tests.helpers.synthetic_coco import process_coco_results, synthetic_coco_detections

needs_shim = pytest.mark.skipif(
    compat.HAS_DETECTRON2_EXTENSION, reason="full detectron2: COCOeval_opt is its C++ evaluator"
)


def _coco(ground_truth, results):
    gt = COCO()
    gt.dataset = ground_truth
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        return gt, gt.loadRes(results)


def _evaluate(cls, gt, dt, iou_type="bbox"):
    evaluation = cls(gt, dt, iou_type)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation, printed.getvalue()


def _per_class_ap(evaluation):
    """AP per category as detectron2's COCOEvaluator computes it (IoU 0.5:0.95, all areas)."""
    precision = evaluation.eval["precision"][:, :, :, 0, -1]
    return np.array([p[p > -1].mean() for p in np.moveaxis(precision, 2, 0)])


@needs_shim
def test_fast_coco_eval_opt_gives_pycocotools_numbers():
    from detectron2.evaluation.fast_eval_api import COCOeval_opt

    assert compat.coco_eval_backend() == "faster-coco-eval"
    assert COCOeval_opt.__mro__[1].__module__.startswith("faster_coco_eval")
    gt, dt = _coco(*synthetic_coco_detections(150, detections_per_image=100, seed=1))
    official, official_text = _evaluate(COCOeval, gt, dt)
    fast, fast_text = _evaluate(COCOeval_opt, gt, dt)

    assert official.stats.shape == fast.stats.shape == (12,)
    assert 0.05 < official.stats[0] < 0.95  # a set where matching decides the numbers
    np.testing.assert_allclose(fast.stats, official.stats, rtol=0, atol=1e-12)
    per_class = _per_class_ap(official)
    assert len(per_class) == 5 and np.ptp(per_class) > 0
    np.testing.assert_allclose(_per_class_ap(fast), per_class, rtol=0, atol=1e-12)
    # The summary is printed as pycocotools prints it (detectron2 shows it in the log).
    assert fast_text.count("Average Precision") == official_text.count("Average Precision") == 6


def _with_masks_and_keypoints(ground_truth, results, seed=3):
    """Box-shaped polygon masks and 17 keypoints in each box, jittered in the detections."""
    rng = np.random.default_rng(seed)

    def polygon(b):
        x, y, w, h = b
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]

    def keypoints(b, noise):
        x, y, w, h = b
        t = np.linspace(0.05, 0.95, 17)[:, None]  # COCO's 17 person keypoints, on a diagonal
        points = np.array([x, y]) + t * [w, h] + rng.normal(0, noise, (17, 2)) * [w, h]
        return [float(v) for p in points for v in (*p, 2)]

    for a in ground_truth["annotations"]:
        a.update(
            segmentation=polygon(a["bbox"]), keypoints=keypoints(a["bbox"], 0), num_keypoints=17
        )
    for r in results:
        r.update(segmentation=polygon(r["bbox"]), keypoints=keypoints(r["bbox"], 0.05))
    return ground_truth, results


@needs_shim
@pytest.mark.parametrize("iou_type", ["segm", "keypoints"])
def test_masks_and_keypoints_also_give_pycocotools_numbers(iou_type):
    from detectron2.evaluation.fast_eval_api import COCOeval_opt

    ground_truth, results = synthetic_coco_detections(40, detections_per_image=20, seed=4)
    gt, dt = _coco(*_with_masks_and_keypoints(ground_truth, results))
    official, _ = _evaluate(COCOeval, gt, dt, iou_type)
    fast, _ = _evaluate(COCOeval_opt, gt, dt, iou_type)
    assert (type(fast) is COCOeval) is (iou_type == "keypoints")  # no faster keypoints, see compat
    assert 0.05 < official.stats[0] < 0.95
    np.testing.assert_allclose(fast.stats, official.stats, rtol=0, atol=1e-12)


def _register(tmp_path, name, ground_truth):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(ground_truth))
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(path), str(tmp_path))
    DatasetCatalog.get(name)  # sets thing_dataset_id_to_contiguous_id and thing_classes


def _run_evaluator(name, results, use_fast_impl):
    evaluator = COCOEvaluator(name, tasks=("bbox",), distributed=False, use_fast_impl=use_fast_impl)
    evaluator.reset()
    process_coco_results(evaluator, name, results)
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluator.evaluate()["bbox"]


@needs_shim
def test_coco_evaluator_fast_and_official_agree(tmp_path):
    ground_truth, results = synthetic_coco_detections(60, detections_per_image=50, seed=2)
    _register(tmp_path, "synthetic_coco_eval_test", ground_truth)
    official = _run_evaluator("synthetic_coco_eval_test", results, use_fast_impl=False)
    fast = _run_evaluator("synthetic_coco_eval_test", results, use_fast_impl=True)
    assert set(fast) == set(official)
    assert {f"AP-class_{c}" for c in (1, 3, 7, 10, 12)} <= set(official)
    assert 5 < official["AP"] < 95
    for key in official:
        assert fast[key] == pytest.approx(official[key], abs=1e-9), key


def test_build_coco_evaluator_uses_the_fast_backend(tmp_path):
    ground_truth, _ = synthetic_coco_detections(3, detections_per_image=5)
    _register(tmp_path, "synthetic_coco_eval_build", ground_truth)
    cfg = san_det.config.get_san_det_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    evaluator = build_coco_evaluator(cfg, "synthetic_coco_eval_build")
    assert evaluator._use_fast_impl is (compat.coco_eval_backend() != "pycocotools")
    assert compat.coco_eval_backend() in ("detectron2._C", "faster-coco-eval")


_FALLBACK = r"""
import contextlib, io, sys
sys.modules["faster_coco_eval"] = None  # not importable
from detectron2.evaluation import coco_evaluation, fast_eval_api
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from san_det import compat
from tests.helpers.synthetic_coco import synthetic_coco_detections

assert compat.coco_eval_backend() == "pycocotools", compat.coco_eval_backend()
assert coco_evaluation.COCOeval_opt is COCOeval and fast_eval_api.COCOeval_opt is COCOeval
ground_truth, results = synthetic_coco_detections(5, detections_per_image=10)
gt = COCO()
gt.dataset = ground_truth
with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
    e = coco_evaluation._evaluate_predictions_on_coco(gt, results, "bbox")
print("AP", e.stats[0])
"""


@pytest.mark.slow
@needs_shim
def test_pycocotools_is_the_fallback_without_faster_coco_eval():
    run = subprocess.run(
        [sys.executable, "-c", _FALLBACK],
        capture_output=True,
        text=True,
        env=child_env(helpers=True),
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("AP 0.")
