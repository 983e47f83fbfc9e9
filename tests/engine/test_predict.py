"""tools/predict.py: drawings and COCO results for a folder of images, read as evaluation reads
them; bad input is one line, exit status 2, nothing written."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

import san_det  # noqa: F401
from san_det.data.coco_example import write_coco_example
from san_det.data.mapper import read_image_robust
from san_det.detection.predict_output import MANIFEST
from san_det.detection.visualize import FilePredictor
from san_det.engine.output_lock import LOCK_FILE_NAME
from tests.helpers.coco_files import write_coco_dataset
from tests.helpers.paths import REPO_ROOT
from tests.helpers.scripts import child_env, load_script
from tests.helpers.tiny_detection import tiny_retinanet_cfg

MODES = ["RGB", "I;16", "RGBA", "CMYK", "P", "L"]


predict_tool = load_script("tools/predict.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A config naming a COCO json (ids 2, 5, 7, 9), random weights, a folder of images."""
    root = tmp_path_factory.mktemp("predict")
    example = write_coco_example(str(root / "data"), num_train=1, num_val=1)
    cfg = tiny_retinanet_cfg(str(root / "train_out"))
    cfg.DATASETS.COCO_INSTANCES = [["pred_val", *example["val"]]]
    cfg.DATASETS.TEST = ("pred_val",)
    cfg.MODEL.RETINANET.NUM_CLASSES = 4
    torch.manual_seed(0)
    weights = root / "model.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    cfg.MODEL.WEIGHTS = str(weights)
    (root / "model.yaml").write_text(cfg.dump())
    images = [
        {"name": f"{i}_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}",
         "mode": mode, "size": (64 + 8 * i, 48), "boxes": [[6, 6, 24, 20]]}
        for i, mode in enumerate(MODES)
    ]  # fmt: skip
    write_coco_dataset(str(root / "images"), images)
    os.remove(root / "images" / "annotations.json")
    return root


def _main(capsys, setup, *args):
    code = predict_tool.main(["--config-file", str(setup / "model.yaml"), *args])
    return code, capsys.readouterr()


@pytest.mark.slow
def test_predict_on_a_folder_as_a_user(setup, tmp_path):
    out = tmp_path / "pred"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools/predict.py"), "--config-file", str(setup / "model.yaml"),
         "--input", str(setup / "images"), "--output", str(out), "--confidence-threshold", "0"],
        capture_output=True, text=True, timeout=300, env=child_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(MODES)}/{len(MODES)} images" in proc.stdout  # the progress line
    names = sorted(os.listdir(setup / "images"))
    drawings = sorted(n for n in os.listdir(out) if n.endswith(".png"))
    assert drawings == sorted(os.path.splitext(n)[0] + ".png" for n in names)
    index = json.loads((out / "images.json").read_text())
    assert [im["id"] for im in index["images"]] == list(range(1, len(names) + 1))
    assert [os.path.basename(im["file_name"]) for im in index["images"]] == names
    assert index["categories"] == [
        {"id": 2, "name": "circle"}, {"id": 5, "name": "square"}, {"id": 7, "name": "star"},
        {"id": 9, "name": "triangle"},
    ]  # fmt: skip
    results = json.loads((out / "coco_instances_results.json").read_text())
    assert {r["image_id"] for r in results} == set(range(1, len(names) + 1))
    assert {r["category_id"] for r in results} <= {2, 5, 7, 9}
    sizes = {im["id"]: (im["width"], im["height"]) for im in index["images"]}
    for r in results:
        x, y, w, h = r["bbox"]
        width, height = sizes[r["image_id"]]
        assert -1e-3 <= x and -1e-3 <= y and x + w <= width + 1e-3 and y + h <= height + 1e-3
        assert 0.0 <= r["score"] <= 1.0
    for name in drawings:  # drawn at twice the original size (small images)
        with Image.open(out / name) as img:
            source = next(im for im in index["images"] if im["drawing"] == name)
            assert img.size == (2 * source["width"], 2 * source["height"])
    hidden = sorted(n for n in os.listdir(out) if n.startswith("."))
    assert hidden == [LOCK_FILE_NAME, MANIFEST]  # no staging folder left


def test_a_16_bit_image_is_predicted_on_its_8_bit_reading(setup, tmp_path):
    from san_det.config import setup_cfg

    cfg = setup_cfg(str(setup / "model.yaml"), ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"],
                    check_output=False)  # fmt: skip
    model = build_model(cfg).eval()
    model.load_state_dict(torch.load(cfg.MODEL.WEIGHTS)["model"])
    deep = str(setup / "images" / "1_I16.png")
    assert Image.open(deep).mode == "I;16"
    eight = tmp_path / "eight.png"
    Image.fromarray(read_image_robust(deep, "L")[:, :, 0], "L").save(eight)
    predictor = FilePredictor(cfg, model)
    a, b = predictor(deep), predictor(str(eight))
    assert len(a) > 0
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=0, atol=0)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)


def test_each_detection_is_named_by_its_own_dataset_category_id(setup, tmp_path, capsys):
    """The json's ids (2, 5, 7, 9 for the model's classes 0..3), detection by detection, against
    the model's own predictions (with their boxes and scores): every class occurs, so the whole
    mapping is checked."""
    from san_det.config import setup_cfg

    opts = ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]
    out = tmp_path / "pred"
    code, streams = _main(capsys, setup, "--input", str(setup / "images"), "--output", str(out),
                          "--confidence-threshold", "0", *opts)  # fmt: skip
    assert code == 0, streams.err
    index = json.loads((out / "images.json").read_text())
    results = json.loads((out / "coco_instances_results.json").read_text())
    cfg = setup_cfg(str(setup / "model.yaml"), opts, check_output=False)
    model = build_model(cfg).eval()
    model.load_state_dict(torch.load(cfg.MODEL.WEIGHTS)["model"])
    predictor, dataset_ids, seen = FilePredictor(cfg, model), [2, 5, 7, 9], set()
    for image in index["images"]:
        instances = predictor(image["file_name"])
        classes = instances.pred_classes.tolist()
        seen.update(classes)
        mine = [r for r in results if r["image_id"] == image["id"]]
        assert [r["category_id"] for r in mine] == [dataset_ids[c] for c in classes]
        # [x, y, w, h] in pixels of the original image, and the model's scores
        x0, y0, x1, y1 = instances.pred_boxes.tensor.double().unbind(1)
        xywh = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=1)
        torch.testing.assert_close(torch.tensor([r["bbox"] for r in mine], dtype=torch.float64),
                                   xywh, rtol=0, atol=1e-4)  # fmt: skip
        assert [r["score"] for r in mine] == pytest.approx(instances.scores.tolist(), abs=1e-6)
    assert seen == {0, 1, 2, 3}


def _truncated(folder):
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "a.jpg")
    good = (folder / "a.jpg").read_bytes()
    (folder / "z.jpg").write_bytes(good[: len(good) * 3 // 4])  # opens, fails when decoded
    return [str(folder)]


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("empty_folder", "no image files"),
        ("missing", "no such file or folder"),
        ("glob_matches_nothing", "no image files"),
        ("garbage", "cannot read image"),
        ("truncated", "cannot read image"),
        ("same_name", "would both be drawn as"),
        ("no_weights", "MODEL.WEIGHTS is empty"),
        ("missing_weights", "MODEL.WEIGHTS file not found"),
        ("unwritable_output", "--output"),
        ("threshold", "--confidence-threshold must be in [0, 1]"),
        ("num_classes", "NUM_CLASSES is 3 but dataset 'pred_val' has 4 categories"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(setup, tmp_path, capsys, case, fragment):
    images = str(setup / "images")
    out = tmp_path / "out"
    args, opts = ["--input", images], []
    if case == "empty_folder":
        (tmp_path / "empty").mkdir()
        args = ["--input", str(tmp_path / "empty")]
    elif case == "missing":
        args = ["--input", str(tmp_path / "nope")]
    elif case == "glob_matches_nothing":
        args = ["--input", str(tmp_path / "*.jpg")]
    elif case == "garbage":
        (tmp_path / "bad.png").write_text("not an image")
        args = ["--input", images, str(tmp_path / "bad.png")]
    elif case == "truncated":
        args = ["--input", *_truncated(tmp_path / "t")]
    elif case == "same_name":
        (tmp_path / "s").mkdir()
        for ext in ("jpg", "png"):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "s" / f"x.{ext}")
        args = ["--input", str(tmp_path / "s")]
    elif case == "no_weights":
        opts = ["MODEL.WEIGHTS", ""]
    elif case == "missing_weights":
        opts = ["MODEL.WEIGHTS", str(tmp_path / "none.pth")]
    elif case == "unwritable_output":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    elif case == "threshold":
        args += ["--confidence-threshold", "1.5"]
    elif case == "num_classes":
        opts = ["MODEL.RETINANET.NUM_CLASSES", "3"]
    code, captured = _main(capsys, setup, *args, "--output", str(out), *opts)
    assert code == 2, captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("predict.py: error:")]
    assert len(errors) == 1 and fragment in errors[0], captured.err
    assert "Traceback" not in captured.err
    assert not out.exists()
    if case == "truncated":  # found while predicting, after a.jpg was drawn (in staging)
        assert "Predicting on 2 images" in captured.out and "z.jpg" in errors[0]
