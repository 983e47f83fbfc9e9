"""The CPU demo (configs/Demo/shapes_retinanet.yaml): a small SASA RetinaNet whose anchors fit the
shapes set; a short training run writes TensorBoard events, the COCO table and prediction images."""

import glob
import os

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

import san_det  # noqa: F401
from san_det.attention_maps import attention_layers
from san_det.data import register_shapes_datasets
from san_det.config import setup_cfg
from san_det.detection import DetectionTrainer
from san_det.detection.visualize import write_prediction_images
from san_det.layers import LocalSelfAttention2d
from tests.helpers.paths import REPO_ROOT

DEMO = str(REPO_ROOT / "configs/Demo/shapes_retinanet.yaml")


def test_demo_config_is_a_small_sasa_retinanet(tmp_path):
    cfg = setup_cfg(DEMO, ["OUTPUT_DIR", str(tmp_path)])
    assert cfg.MODEL.DEVICE == "cpu" and cfg.MODEL.WEIGHTS == ""
    assert cfg.DATASETS.TRAIN == ("shapes_train",) and cfg.DATASETS.TEST == ("shapes_val",)
    assert cfg.DATALOADER.NUM_WORKERS == 1
    model = build_model(cfg)
    layers = attention_layers(model.backbone.bottom_up)
    # every bottleneck of SASA-26 ([1, 2, 4, 1]) has attention
    assert len(layers) == 8 and all(isinstance(m, LocalSelfAttention2d) for m in layers.values())
    assert {m.kernel_size for m in layers.values()} == {cfg.MODEL.SASA.KERNEL_SIZE}
    params = sum(p.numel() for p in model.parameters())
    assert params < 2_000_000, params  # small enough to train on 2 CPU cores
    # anchors span the shapes' 10-58 px on the features the head uses
    sizes = [s for level in cfg.MODEL.ANCHOR_GENERATOR.SIZES for s in level]
    assert min(sizes) <= 12 and max(sizes) >= 58
    assert len(cfg.MODEL.ANCHOR_GENERATOR.SIZES) == len(cfg.MODEL.RETINANET.IN_FEATURES)
    shapes = model.backbone.output_shape()
    assert all(f in shapes for f in cfg.MODEL.RETINANET.IN_FEATURES)


@pytest.mark.slow
def test_demo_training_writes_events_and_prediction_images(tmp_path):
    register_shapes_datasets(root=str(tmp_path / "data"), num_train=8, num_val=4, prefix="dshapes")
    out = tmp_path / "out"
    cfg = setup_cfg(
        DEMO,
        [
            "DATASETS.TRAIN", "('dshapes_train',)",
            "DATASETS.TEST", "('dshapes_val',)",
            "SOLVER.MAX_ITER", "2",
            "SOLVER.IMS_PER_BATCH", "4",
            "SOLVER.WARMUP_ITERS", "1",
            "DATALOADER.NUM_WORKERS", "0",
            "TEST.PREDICTION_IMAGES", "3",
            "OUTPUT_DIR", str(out),
        ],
    )  # fmt: skip
    trainer = DetectionTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    # detectron2 0.6's train() returns None unless TEST.EXPECTED_RESULTS is set; the final
    # evaluation (after the last iteration) stores its results here
    assert "bbox" in trainer._last_eval_results
    assert glob.glob(str(out / "events.out.tfevents.*")), os.listdir(out)
    assert (out / "metrics.json").exists()
    written = sorted(os.listdir(out / "predictions" / "dshapes_val"))
    assert written == ["000000.png", "000001.png", "000002.png", "predictions.png"]
    with Image.open(out / "predictions" / "dshapes_val" / "000000.png") as img:
        assert img.size == (2 * 256 + 4, 256)  # ground truth | predictions at scale 2
    with Image.open(out / "predictions" / "dshapes_val" / "predictions.png") as img:
        assert img.size == (3 * 256 + 2 * 4, 256)


def test_prediction_images_draw_ground_truth_and_predictions(tmp_path):
    """Ground-truth boxes change the left half; a detector returning one confident box changes
    the right half only where it is drawn, and one below the threshold is not drawn."""
    register_shapes_datasets(root=str(tmp_path / "data"), num_train=1, num_val=2, prefix="vshapes")
    cfg = setup_cfg(DEMO, ["DATASETS.TEST", "('vshapes_val',)", "OUTPUT_DIR", str(tmp_path)])
    from detectron2.data import DatasetCatalog
    from detectron2.structures import Boxes, Instances

    class FixedDetector(torch.nn.Module):
        def __init__(self, score):
            super().__init__()
            self.score = score

        def forward(self, inputs):
            h, w = inputs[0]["height"], inputs[0]["width"]
            inst = Instances((h, w))
            inst.pred_boxes = Boxes(torch.tensor([[10.0, 10.0, 60.0, 60.0]]))
            inst.scores = torch.tensor([self.score])
            inst.pred_classes = torch.tensor([1])
            return [{"instances": inst}]

    record = DatasetCatalog.get("vshapes_val")[0]
    raw = np.asarray(Image.open(record["file_name"]).convert("RGB").resize((256, 256)))
    images = {}
    for score in (0.9, 0.2):
        paths = write_prediction_images(
            cfg, FixedDetector(score), output_dir=str(tmp_path / f"s{score}"), num_images=1
        )
        assert [os.path.basename(p) for p in paths] == ["000000.png", "predictions.png"]
        images[score] = np.asarray(Image.open(paths[0]).convert("RGB")).astype(int)
    left, right_hi = images[0.9][:, :256], images[0.9][:, 260:]
    right_lo = images[0.2][:, 260:]
    if record["annotations"]:
        assert np.abs(left - raw).sum(-1).max() > 100  # boxes drawn
    assert np.abs(right_lo - raw).max() < 60  # nothing drawn: the resized image only
    diff = np.abs(right_hi - right_lo).sum(-1) > 60
    assert diff.any()
    # the box 10..60 px at scale 2: its edges at 20 and 120, its label next to it, nothing else
    assert diff[17:24, 30:110].any() and diff[117:124, 30:110].any()
    assert diff[30:110, 17:24].any() and diff[30:110, 117:124].any()
    assert not diff[160:].any() and not diff[:, 160:].any()
    with pytest.raises(ValueError, match="num_images"):
        write_prediction_images(cfg, FixedDetector(0.9), num_images=0)
