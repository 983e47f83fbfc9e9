"""Bad inputs: unreadable images, every image mode, bad boxes, images without annotations, and
NaN/inf during training (stop with the iteration; the last good checkpoint stays)."""

import logging
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.structures import BoxMode

import san_det  # noqa: F401
from san_det.data.mapper import (
    RobustDatasetMapper,
    sanitize_annotations,
    sanitize_dataset_dicts,
)
from san_det.detection import DetectionTrainer
from san_det.engine import NonFiniteError
from san_det.errors import CorruptImageError
from tests.helpers.coco_files import register_coco_dataset, simple_images
from tests.helpers.scripts import error_lines, load_script
from tests.helpers.tiny_detection import tiny_retinanet_cfg

BOX = [[8.0, 8.0, 20.0, 20.0]]


def _trainer(tmp_path, name, images, iters=2, **cfg_changes):
    register_coco_dataset(name, str(tmp_path / name), images)
    cfg = tiny_retinanet_cfg(str(tmp_path / f"out_{name}"), (name,), max_iter=iters)
    for key, value in cfg_changes.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = getattr(node, p)
        setattr(node, last, value)
    trainer = DetectionTrainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer


# ------------------------------------------------------------------------- unreadable images
@pytest.mark.parametrize("broken", ["truncated", "garbage", "missing"])
def test_unreadable_image_stops_training_naming_the_file(tmp_path, broken):
    images = [
        {"name": "good.png", "boxes": BOX},
        {"name": "bad.jpg", "boxes": BOX, "broken": broken},
    ]
    trainer = _trainer(tmp_path, f"unreadable_{broken}", images)
    with pytest.raises(CorruptImageError, match=r"cannot read image .*bad\.jpg"):
        trainer.train()


def test_unreadable_image_is_skipped_with_a_warning_when_allowed(tmp_path, caplog):
    images = [
        {"name": "good.png", "boxes": BOX},
        {"name": "bad.jpg", "boxes": BOX, "broken": "truncated"},
    ]
    skip = {"DATALOADER.SKIP_CORRUPT_IMAGES": True}
    trainer = _trainer(tmp_path, "skip", images, iters=3, **skip)
    seen = []
    loader_iter = iter(trainer.data_loader)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            seen += [d["file_name"] for d in next(loader_iter)]
        trainer.train()
    assert seen and all(f.endswith("good.png") for f in seen)
    warned = [r.getMessage() for r in caplog.records if "Skipping an unreadable" in r.getMessage()]
    assert warned and "bad.jpg" in warned[0]
    assert len(trainer.storage.history("total_loss").values()) == 3


def test_train_net_reports_an_unreadable_image_in_one_line(tmp_path, capsys):
    images = [{"name": "bad.jpg", "boxes": BOX, "broken": "truncated"}] * 1
    register_coco_dataset("cli_unreadable", str(tmp_path / "data"), images)
    cfg = tiny_retinanet_cfg(str(tmp_path / "out"), ("cli_unreadable",), max_iter=2)
    cfg.DATALOADER.NUM_WORKERS = 1  # the error comes back from a loader worker process
    (tmp_path / "tiny.yaml").write_text(cfg.dump())
    with pytest.raises(SystemExit) as info:
        load_script("train_net.py").cli(["--config-file", str(tmp_path / "tiny.yaml")])
    assert info.value.code == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and str(tmp_path / "data" / "bad.jpg") in errors[0], errors
    assert "Traceback" not in errors[0] and "truncated" in errors[0], errors


# ------------------------------------------------------------------------------ image modes
MODES = [
    ("gray.png", "L"),
    ("gray_alpha.png", "LA"),
    ("rgba.png", "RGBA"),
    ("palette.png", "P"),
    ("gray16.png", "I;16"),
    ("cmyk.jpg", "CMYK"),
    ("binary.png", "1"),
]


def test_every_image_mode_is_read_as_bgr_and_trains(tmp_path):
    images = [{"name": name, "mode": mode, "boxes": BOX} for name, mode in MODES]
    trainer = _trainer(tmp_path, "modes", images, iters=2, **{"SOLVER.IMS_PER_BATCH": 7})
    mapper = RobustDatasetMapper(trainer.cfg, True)
    for d in DatasetCatalog.get("modes"):
        out = mapper(d)
        image = out["image"]
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8, d["file_name"]
        assert image.float().std() > 5, d["file_name"]  # not blank
        if Path(d["file_name"]).name.startswith(("gray", "binary")):
            assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
        assert len(out["instances"]) == 1
    trainer.train()
    assert all(math.isfinite(v) for v, _ in trainer.storage.history("total_loss").values())


# ------------------------------------------------------------------------------------ boxes
def test_bad_boxes_are_clipped_or_dropped_and_counted(tmp_path, caplog):
    boxes = [
        [8, 8, 20, 20],  # fine
        [10, 10, 0, 12],  # zero width -> dropped
        [10, 10, 12, -5],  # negative height -> dropped
        [50, 50, 30, 30],  # partly outside -> clipped to 64
        [-10, 4, 20, 20],  # partly outside -> clipped to 0
        [70, 70, 10, 10],  # fully outside -> dropped
        [float("nan"), 4, 10, 10],  # NaN -> dropped
    ]
    images = [
        {"name": "boxes.png", "boxes": boxes, "classes": [0, 1, 2, 0, 1, 2, 0]},
        {"name": "all_bad.png", "boxes": [[3, 3, 0, 0]]},
    ]
    register_coco_dataset("bad_boxes", str(tmp_path / "data"), images)
    dicts = DatasetCatalog.get("bad_boxes")
    with caplog.at_level(logging.WARNING):
        kept = sanitize_dataset_dicts(dicts, filter_empty=False, name="bad_boxes")
    message = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bad_boxes:")]
    assert message == [
        "bad_boxes: 5 boxes dropped (3 with non-positive width or height, 1 outside the image, "
        "1 with NaN/inf coordinates), 2 boxes clipped to the image; 1 images left without boxes "
        "(kept as negatives)"
    ]
    assert len(kept) == 2 and len(kept[0]["annotations"]) == 3 and kept[1]["annotations"] == []
    assert [(a["bbox"], a["bbox_mode"]) for a in kept[0]["annotations"]] == [
        ([8.0, 8.0, 20.0, 20.0], BoxMode.XYWH_ABS),  # untouched
        ([50.0, 50.0, 64.0, 64.0], BoxMode.XYXY_ABS),
        ([0.0, 4.0, 10.0, 24.0], BoxMode.XYXY_ABS),
    ]
    assert len(sanitize_dataset_dicts(dicts, filter_empty=True)) == 1

    cfg = tiny_retinanet_cfg(str(tmp_path / "out"), ("bad_boxes",))
    mapper = RobustDatasetMapper(cfg, True)
    mapper.augmentations.augs = mapper.augmentations.augs[:1]  # no random flip: fixed boxes
    out = mapper(dicts[0])  # the mapper checks the unsanitised dict against the real image too
    boxes_out = out["instances"].gt_boxes.tensor
    assert boxes_out.shape == (3, 4)
    assert float(boxes_out.min()) >= 0 and float(boxes_out.max()) <= 64
    assert sorted(boxes_out.tolist()) == [[0, 4, 10, 24], [8, 8, 28, 28], [50, 50, 64, 64]]
    assert sorted(out["instances"].gt_classes.tolist()) == [0, 0, 1]
    assert mapper.box_counts["clipped"] == 2 and mapper.box_counts["dropped_degenerate"] == 2


def test_sanitized_boxes_are_exactly_their_part_inside_the_image():
    """Each side is clamped to [0, width] x [0, height]; a box inside stays the same object."""
    inside = {"bbox": [1.5, 2.0, 3.0, 4.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}
    cases = [
        ([-3.0, -1.0, 20.0, 10.0], BoxMode.XYXY_ABS, [0.0, 0.0, 20.0, 10.0]),
        ([30.0, 15.0, 45.0, 27.5], BoxMode.XYXY_ABS, [30.0, 15.0, 40.0, 25.0]),
        ([-5.0, 20.0, 50.0, 10.0], BoxMode.XYWH_ABS, [0.0, 20.0, 40.0, 25.0]),
        ([39.0, -2.0, 41.0, 0.5], BoxMode.XYXY_ABS, [39.0, 0.0, 40.0, 0.5]),
    ]
    annotations = [inside] + [
        {"bbox": box, "bbox_mode": mode, "category_id": i}
        for i, (box, mode, _) in enumerate(cases, start=1)
    ]
    counts = Counter()
    kept = sanitize_annotations(annotations, height=25, width=40, counts=counts)
    assert counts == Counter(clipped=4)
    assert kept[0] is inside
    assert [a["bbox"] for a in kept[1:]] == [expected for _, _, expected in cases]
    assert all(a["bbox_mode"] == BoxMode.XYXY_ABS for a in kept[1:])
    assert [a["category_id"] for a in kept] == [0, 1, 2, 3, 4]
    assert annotations[1]["bbox"] == [-3.0, -1.0, 20.0, 10.0]  # the input is not modified


# ----------------------------------------------------------------- images without annotations
def test_images_without_annotations_are_negatives_for_retinanet(tmp_path):
    images = [{"name": "empty0.png"}, {"name": "empty1.png"}]
    trainer = _trainer(tmp_path, "negatives", images, iters=2)
    batch = next(iter(trainer.data_loader))
    assert len(batch) == 2 and all(len(d["instances"]) == 0 for d in batch)
    trainer.train()
    history = trainer.storage.history
    assert all(v == 0 for v, _ in history("loss_box_reg").values())
    assert all(math.isfinite(v) and v > 0 for v, _ in history("loss_cls").values())
    mixed = [{"name": "empty.png"}, {"name": "boxed.png", "boxes": BOX}, {"name": "e2.png"}]
    register_coco_dataset("mixed", str(tmp_path / "mixed"), mixed)
    cfg = tiny_retinanet_cfg(str(tmp_path / "f"), ("mixed",))
    assert DetectionTrainer.build_train_loader(cfg).stream.num_images == 3
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True  # detectron2's default drops them
    assert DetectionTrainer.build_train_loader(cfg).stream.num_images == 1


# ------------------------------------------------------------------------------------ NaN/inf
class _Poison(HookBase):
    """Sets a weight to NaN after iteration ``at`` (a diverged step in miniature)."""

    def __init__(self, at):
        self.at = at

    def after_step(self):
        if self.trainer.iter == self.at:
            model = self.trainer.model
            with torch.no_grad():
                getattr(model, "module", model).head.cls_score.weight.fill_(float("nan"))


def _last_checkpoint(trainer):
    out = Path(trainer.cfg.OUTPUT_DIR)
    name = (out / "last_checkpoint").read_text()
    weights = torch.load(out / name, map_location="cpu")["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    return name


def test_nan_loss_stops_with_the_iteration_keeping_the_last_good_checkpoint(tmp_path):
    trainer = _trainer(
        tmp_path, "nan_loss", simple_images(4), iters=8, **{"SOLVER.CHECKPOINT_PERIOD": 2}
    )
    trainer.register_hooks([_Poison(at=2)])  # after the checkpointer: iteration 3 sees NaN
    expected = r"non-finite loss at iteration 3 .*model_0000001\.pth"
    with pytest.raises(NonFiniteError, match=expected):
        trainer.train()
    assert _last_checkpoint(trainer) == "model_0000001.pth"
    assert not (Path(trainer.cfg.OUTPUT_DIR) / "model_0000003.pth").exists()


def test_a_nan_model_is_never_checkpointed(tmp_path):
    trainer = _trainer(
        tmp_path, "nan_save", simple_images(4), iters=8, **{"SOLVER.CHECKPOINT_PERIOD": 2}
    )
    trainer.register_hooks([_Poison(at=3)])
    trainer._hooks.insert(0, trainer._hooks.pop())  # poison before the checkpoint of iteration 3
    with pytest.raises(NonFiniteError, match=r"head.cls_score.weight.*iteration 3.*not written"):
        trainer.train()
    assert _last_checkpoint(trainer) == "model_0000001.pth"


def test_diverging_training_stops_in_one_line(tmp_path, capsys):
    register_coco_dataset("diverge", str(tmp_path / "data"), simple_images(4))
    cfg = tiny_retinanet_cfg(str(tmp_path / "out"), ("diverge",), max_iter=12)
    cfg.SOLVER.CHECKPOINT_PERIOD = 2
    cfg.SOLVER.BASE_LR = 1e6
    (tmp_path / "tiny.yaml").write_text(cfg.dump())
    with pytest.raises(SystemExit) as info:
        load_script("train_net.py").cli(["--config-file", str(tmp_path / "tiny.yaml")])
    assert info.value.code == 1
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "non-finite" in errors[0] and "at iteration" in errors[0], errors
    last = (tmp_path / "out" / "last_checkpoint").read_text()
    assert last in errors[0]
    weights = torch.load(tmp_path / "out" / last, map_location="cpu")["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
