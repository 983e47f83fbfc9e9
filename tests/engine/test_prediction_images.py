"""Prediction images: the model sees what evaluation sees (16-bit and other modes read like the
mapper reads them), large images are drawn small, the threshold and count are config keys;
metrics.json stays valid JSON."""

import json
import math

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from PIL import Image

import san_det  # noqa: F401
from san_det.data.mapper import RobustDatasetMapper, read_image_robust
from san_det.engine.metrics_json import FiniteJSONWriter
from san_det.detection.visualize import drawing_scale, write_prediction_images
from tests.helpers.coco_files import register_coco_dataset
from tests.helpers.paths import config_path
from tests.helpers.scripts import assert_one_line_error, cli_in_process, load_script
from tests.helpers.tiny_detection import tiny_retinanet_cfg


class RecordingDetector(torch.nn.Module):
    """Returns one box of a fixed score; keeps the images it was given."""

    def __init__(self, score=0.9):
        super().__init__()
        self.score, self.seen = score, []

    def forward(self, inputs):
        self.seen.append(inputs[0]["image"].clone())
        h, w = inputs[0]["height"], inputs[0]["width"]
        inst = Instances((h, w))
        inst.pred_boxes = Boxes(torch.tensor([[4.0, 4.0, w / 2, h / 2]]))
        inst.scores = torch.tensor([self.score])
        inst.pred_classes = torch.tensor([0])
        return [{"instances": inst}]


def _cfg(tmp_path, name, *opts):
    cfg = tiny_retinanet_cfg(str(tmp_path / "out"))
    cfg.DATASETS.TEST = (name,)
    cfg.merge_from_list(list(opts))
    return cfg


def test_a_16_bit_image_is_predicted_and_drawn_as_evaluation_reads_it(tmp_path):
    images = [{"name": "deep.png", "mode": "I;16", "boxes": [[8, 8, 30, 30]]},
              {"name": "rgba.png", "mode": "RGBA", "boxes": [[8, 8, 30, 30]]}]  # fmt: skip
    register_coco_dataset("vis16", str(tmp_path / "data"), images)
    cfg = _cfg(tmp_path, "vis16")
    model = RecordingDetector()
    paths = write_prediction_images(cfg, model, output_dir=str(tmp_path / "p"), num_images=2)
    assert len(paths) == 3
    mapper = RobustDatasetMapper(cfg, is_train=False)
    for record, seen, path in zip(DatasetCatalog.get("vis16"), model.seen, paths):
        # the model got exactly the tensor the test loader would give it
        torch.testing.assert_close(seen, mapper(record)["image"], rtol=0, atol=0)
        expected = read_image_robust(record["file_name"], "RGB").astype(float)
        drawn = np.asarray(Image.open(path).convert("RGB"), dtype=float)
        assert drawn.shape == (128, 2 * 128 + 4, 3)  # 64 px drawn at scale 2, both halves
        # away from the drawn boxes the picture is the image itself, not blank white
        corner = drawn[-40:, -40:]  # bottom right of the predictions half
        upsampled = np.kron(expected[-20:, -20:], np.ones((2, 2, 1)))
        assert np.abs(corner - upsampled).mean() < 12
        assert expected.mean() < 150 and corner.mean() < 150


def test_a_large_image_is_drawn_no_larger_than_the_cap(tmp_path):
    folder = tmp_path / "big"
    register_coco_dataset(
        "visbig",
        str(folder),
        [{"name": "big.png", "size": (3000, 2000), "boxes": [[100, 100, 900, 600]]}],
    )
    cfg = _cfg(tmp_path, "visbig")
    paths = write_prediction_images(cfg, RecordingDetector(), output_dir=str(tmp_path / "p"))
    with Image.open(paths[0]) as img:
        width, height = img.size
    assert width == 2 * 1024 + 4 and 660 <= height <= 700
    cfg.TEST.PREDICTION_IMAGE_MAX_SIZE = 300
    paths = write_prediction_images(cfg, RecordingDetector(), output_dir=str(tmp_path / "q"))
    with Image.open(paths[0]) as img:
        assert img.size[0] == 2 * 300 + 4
    assert drawing_scale(128, 128) == 2.0 and drawing_scale(3000, 2000, 1024) == 1024 / 3000
    with pytest.raises(ValueError, match="max_size"):
        drawing_scale(10, 10, 0)


def test_score_threshold_and_count_come_from_the_config(tmp_path):
    register_coco_dataset(
        "visthr", str(tmp_path / "data"), [{"name": f"{i}.png"} for i in range(3)]
    )
    drawn = {}
    for threshold in ("0.5", "0.95"):
        cfg = _cfg(tmp_path, "visthr", "TEST.PREDICTION_SCORE_THRESHOLD", threshold,
                   "TEST.PREDICTION_IMAGES", "2")  # fmt: skip
        paths = write_prediction_images(
            cfg, RecordingDetector(0.9), output_dir=str(tmp_path / threshold)
        )
        assert [p.rsplit("/", 1)[1] for p in paths] == ["0.png", "1.png", "predictions.png"]
        drawn[threshold] = np.asarray(Image.open(paths[0]).convert("RGB"), dtype=int)
    right = slice(128 + 4, None)
    changed = np.abs(drawn["0.5"][:, right] - drawn["0.95"][:, right]).sum(-1) > 60
    assert changed.any()  # the 0.9 box is drawn at 0.5 only
    assert not changed[70:, 70:].any()  # and nowhere but around it (box 4..32 px at scale 2)


def test_metrics_json_writes_nan_and_inf_as_null(tmp_path):
    path = tmp_path / "metrics.json"
    writer = FiniteJSONWriter(str(path))
    with EventStorage(0) as storage:
        storage.put_scalars(AP=12.5, APl=float("nan"), big=float("inf"), smoothing_hint=False)
        writer.write()
        storage.iter = 1
        storage.put_scalars(AP=13.0, smoothing_hint=False)
        writer.write()
    writer.close()

    def strict(token):
        raise ValueError(f"not JSON: {token}")

    lines = [json.loads(line, parse_constant=strict) for line in path.read_text().splitlines()]
    assert lines[0] == {"AP": 12.5, "APl": None, "big": None, "iteration": 0}
    assert lines[1] == {"AP": 13.0, "iteration": 1}
    assert not math.isnan(lines[1]["AP"])


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("TEST.PREDICTION_SCORE_THRESHOLD", "2.0", "in [0, 1]"),
        ("TEST.PREDICTION_IMAGES", "-1", ">= 0"),
        ("TEST.PREDICTION_IMAGE_MAX_SIZE", "0", ">= 1"),
    ],
)
def test_bad_prediction_image_keys_are_one_line(tmp_path, capsys, key, value, fragment):
    demo = config_path("Demo", "shapes_retinanet.yaml")
    args = ("--config-file", demo, key, value, "OUTPUT_DIR", str(tmp_path / "o"))
    proc = cli_in_process(load_script("train_net.py"), capsys, *args)
    assert_one_line_error(proc, key, fragment)
    assert not (tmp_path / "o").exists()
