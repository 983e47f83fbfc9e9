"""A few training iterations on the shapes set, then COCO evaluation through pycocotools."""

import math

import pytest

import san_det  # noqa: F401
from san_det.data import register_shapes_datasets
from san_det.config import setup_cfg
from san_det.detection import DetectionTrainer
from san_det.engine import validate_datasets
from tests.helpers.paths import REPO_ROOT

DEMO = str(REPO_ROOT / "configs/Demo/shapes_retinanet.yaml")


def _demo_cfg(tmp_path, prefix: str, num_train: int, num_val: int, *overrides: str):
    """The demo config on fresh shapes sets ``<prefix>_train`` / ``<prefix>_val`` in
    ``tmp_path/data``, without data-loader workers, writing into ``tmp_path/out``."""
    root = str(tmp_path / "data")
    register_shapes_datasets(root=root, num_train=num_train, num_val=num_val, prefix=prefix)
    common = ["DATASETS.TRAIN", f"('{prefix}_train',)", "DATALOADER.NUM_WORKERS", "0"]
    return setup_cfg(DEMO, [*common, *overrides, "OUTPUT_DIR", str(tmp_path / "out")])


@pytest.mark.slow
def test_train_then_coco_eval(tmp_path):
    cfg = _demo_cfg(
        tmp_path,
        "tshapes",
        24,
        8,
        *("DATASETS.TEST", "('tshapes_val',)", "SOLVER.MAX_ITER", "3"),
        *("SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "1"),
        # an untrained model scores below the default 0.05: keep every detection so that
        # pycocotools really evaluates predictions
        *("MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"),
    )
    validate_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    trainer = DetectionTrainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()  # DefaultTrainer evaluates after the last iteration
    losses = trainer.storage.history("total_loss").values()
    assert len(losses) == 3 and all(math.isfinite(v) for v, _ in losses)

    bbox = results["bbox"]
    assert set(bbox) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    # pycocotools reports -1 (detectron2: NaN) for an empty area range: the 128 px images hold
    # no large (> 96^2 px) objects
    assert all(math.isfinite(bbox[k]) for k in ("AP", "AP50", "AP75", "APs", "APm")), bbox
    assert math.isnan(bbox["APl"])
    assert 0.0 <= bbox["AP50"] <= 100.0
    assert (tmp_path / "out" / "inference" / "tshapes_val" / "coco_instances_results.json").exists()
    results_file = tmp_path / "out" / "inference" / "tshapes_val" / "coco_instances_results.json"
    expected = _pycocotools_box_ap("tshapes_val", results_file)
    assert expected["AP"] > 0 and expected["AP50"] > 0  # something to compare
    for key, value in expected.items():
        # the same detections and the same definition: only float64 summation order may differ
        assert bbox[key] == pytest.approx(value, rel=1e-9, abs=1e-9, nan_ok=True), key


def _pycocotools_box_ap(dataset: str, results_file) -> dict:
    """Box AP (percent) of the saved detections, computed from scratch: pycocotools' COCOeval
    (not the backend training used) against the ground truth written out from the dataset."""
    import contextlib
    import io
    import json

    from detectron2.data.datasets.coco import convert_to_coco_dict
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = convert_to_coco_dict(dataset)
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(json.loads(results_file.read_text())), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    return {n: float("nan") if s < 0 else 100.0 * s for n, s in zip(names, evaluation.stats)}


@pytest.mark.slow
def test_demo_config_loss_decreases(tmp_path):
    """A short run of the demo model (the config `make demo` trains) learns: the loss falls."""
    cfg = _demo_cfg(
        tmp_path,
        "lshapes",
        64,
        4,
        *("DATASETS.TEST", "()", "SOLVER.MAX_ITER", "25", "SOLVER.IMS_PER_BATCH", "8"),
        *("SOLVER.WARMUP_ITERS", "5", "SEED", "3"),
    )
    trainer = DetectionTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 25 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"mean loss, first 5 iterations {first:.3f}, last 5 {last:.3f}")
    assert last < 0.8 * first, (first, last)
