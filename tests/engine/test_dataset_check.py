"""train_net.py's dataset check, run as a user runs it: a COCO example written by
tools/make_coco_example.py, altered the way real exports go wrong. Every bad input is exactly one
line on stderr (nothing else there), exit status 2, and no OUTPUT_DIR."""

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from tests.helpers.paths import REPO_ROOT
from tests.helpers.scripts import assert_one_line_error, child_env

pytestmark = pytest.mark.slow

CONFIG = str(REPO_ROOT / "configs/Demo/own_coco_example.yaml")
TRAIN_JSON = "datasets/shapes_coco/annotations/instances_train.json"
VAL_JSON = "datasets/shapes_coco/annotations/instances_val.json"
#: a wrong class count stops a run whose datasets passed the check, before anything is written
STOP_AFTER_CHECK = ("MODEL.RETINANET.NUM_CLASSES", "3")
STOPPED_AFTER_CHECK = "MODEL.RETINANET.NUM_CLASSES is 3 but dataset"
#: a short run where the check lets bad data through (main before the check: minutes, not hours)
SHORT = ["SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "2", "TEST.PREDICTION_IMAGES", "0"]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coco_example")
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools/make_coco_example.py"), "--output",
         str(folder / "datasets/shapes_coco"), "--num-train", "8", "--num-val", "4",
         "--image-size", "64"],
        capture_output=True, text=True, env=child_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return folder


@pytest.fixture
def workdir(example, tmp_path):
    """A fresh copy of the example (the working folder of the run) and its own check cache."""
    shutil.copytree(example / "datasets", tmp_path / "datasets")
    return tmp_path


def edit_json(workdir, relative, change):
    path = workdir / relative
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def train_net(workdir, *args, config=CONFIG, **env):
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_net.py"), "--config-file", config, *args, *SHORT,
         "OUTPUT_DIR", "out"],
        cwd=workdir, capture_output=True, text=True, timeout=600,
        env=child_env(SAN_DET_CACHE=str(workdir / "cache"), **env),
    )  # fmt: skip


def assert_refused(proc, workdir, *fragments):
    """One error line holding ``fragments``, exit 2, nothing else on stderr, no OUTPUT_DIR."""
    assert_one_line_error(proc, *fragments)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (workdir / "out").exists()


@pytest.mark.parametrize(
    "json_file, change, message",
    [
        (TRAIN_JSON, lambda d: d["images"][1].update(id=1), "dataset 'shapes_coco_train': "
         f"{TRAIN_JSON}: image id 1 is used twice ('000000.jpg' and '000001.jpg'), at images[0] "
         "and images[1]"),
        (VAL_JSON, lambda d: d["categories"][1].update(id=2), f"dataset 'shapes_coco_val': "
         f"{VAL_JSON}: category id 2 is used twice ('circle' and 'square')"),
    ],
)  # fmt: skip
def test_duplicate_ids(workdir, json_file, change, message):
    """Two images sharing an id: detectron2 trains one with the other's boxes (silently)."""
    edit_json(workdir, json_file, change)
    assert_refused(train_net(workdir), workdir, message)


def _set_bbox(value):
    def change(data):
        if value is KeyError:
            del data["annotations"][0]["bbox"]
        else:
            data["annotations"][0]["bbox"] = value

    return change


@pytest.mark.parametrize(
    "bbox, message",
    [
        (["1", "2", "3", "4"], "bbox ['1', '2', '3', '4'] holds a value that is not a number"),
        (None, "bbox None is not a list [x, y, width, height]"),
        (KeyError, "no 'bbox'"),
        ([1.0, 2.0, 3.0], "bbox [1.0, 2.0, 3.0] has 3 numbers, not 4"),
    ],
)
def test_malformed_bbox(workdir, bbox, message):
    edit_json(workdir, TRAIN_JSON, _set_bbox(bbox))
    proc = train_net(workdir)
    assert_refused(proc, workdir, f"{TRAIN_JSON}: annotation id 1: {message}")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["images"][0].update(width="64"), "image id 1: width '64' is not a positive"),
        (lambda d: d.pop("images"), "no 'images' key"),
        (lambda d: d["annotations"][0].update(category_id=3), "annotation id 1: category_id 3"),
    ],
)
def test_malformed_json(workdir, change, message):
    """The issue's cases; tests/data/test_coco_format.py checks the classes of malformed input."""
    edit_json(workdir, TRAIN_JSON, change)
    proc = train_net(workdir)
    assert_refused(proc, workdir, f"dataset 'shapes_coco_train': {TRAIN_JSON}: {message}")


def test_size_mismatch_and_a_count_of_the_others(workdir):
    def change(data):
        data["images"][2]["width"] = 65
        data["images"][5]["height"] = 80
        data["annotations"][0]["bbox"] = None

    edit_json(workdir, TRAIN_JSON, change)
    proc = train_net(workdir)
    assert_refused(
        proc, workdir, f"{TRAIN_JSON}: annotation id 1: bbox None is not a list",
        "; and 2 more (2 size mismatches)",
    )  # fmt: skip
    edit_json(workdir, TRAIN_JSON, lambda d: d["annotations"][0].update(bbox=[1, 1, 9, 9]))
    proc = train_net(workdir)
    assert_refused(
        proc, workdir, "image id 3: datasets/shapes_coco/train/000002.jpg is 64x64 (width x "
        "height, after its EXIF orientation) but the json says 65x64; and 1 more (1 size "
        "mismatches)",
    )  # fmt: skip


def _write_rotated_jpeg(path, size, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", size, (90, 120, 30)).save(path, exif=exif.tobytes())


def test_exif_orientation_is_applied_as_detectron2_reads_the_image(workdir):
    """A 64x48 JPEG rotated by its EXIF tag is read 48x64: the json must say so."""
    _write_rotated_jpeg(workdir / "datasets/shapes_coco/train/000003.jpg", (64, 48), 6)
    edit_json(workdir, TRAIN_JSON, lambda d: d["images"][3].update(width=64, height=48))
    proc = train_net(workdir)
    assert_refused(
        proc, workdir, "image id 4: datasets/shapes_coco/train/000003.jpg is 48x64 (width x "
        "height, after its EXIF orientation) but the json says 64x48",
    )  # fmt: skip
    edit_json(workdir, TRAIN_JSON, lambda d: d["images"][3].update(width=48, height=64))
    assert_refused(train_net(workdir, *STOP_AFTER_CHECK), workdir, STOPPED_AFTER_CHECK)


def _break(path, how):
    if how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"<html>not an image</html>\n")


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing", "file not found: datasets/shapes_coco/val/000001.jpg"),
        ("empty", "cannot read datasets/shapes_coco/val/000001.jpg: empty file (0 bytes)"),
        ("truncated", "cannot read datasets/shapes_coco/val/000001.jpg: truncated JPEG file"),
        ("garbage", "cannot read datasets/shapes_coco/val/000001.jpg: not an image"),
    ],
)
def test_unreadable_image_is_found_before_anything_is_written(workdir, how, message):
    _break(workdir / "datasets/shapes_coco/val/000001.jpg", how)
    proc = train_net(workdir, "DATALOADER.SKIP_CORRUPT_IMAGES", "True")  # a test set: no skip
    assert_refused(proc, workdir, f"dataset 'shapes_coco_val': {VAL_JSON}: image id 2: {message}")


def test_unreadable_training_images_are_a_counted_warning_with_skip_corrupt_images(workdir):
    for name in ("000002.jpg", "000005.jpg"):
        _break(workdir / "datasets/shapes_coco/train" / name, "truncated")
    proc = train_net(workdir, *STOP_AFTER_CHECK)
    assert_refused(proc, workdir, "image id 3: cannot read", "; and 1 more (1 unreadable image")
    proc = train_net(workdir, "DATALOADER.SKIP_CORRUPT_IMAGES", "True", *STOP_AFTER_CHECK)
    assert_refused(proc, workdir, STOPPED_AFTER_CHECK)
    assert "dataset 'shapes_coco_train': 2 of 8 images cannot be read and are skipped" in (
        proc.stdout
    )


def test_every_training_image_unreadable_with_skip_corrupt_images(workdir):
    for path in (workdir / "datasets/shapes_coco/train").iterdir():
        _break(path, "garbage")
    proc = train_net(workdir, "DATALOADER.SKIP_CORRUPT_IMAGES", "True")
    assert_refused(
        proc, workdir, "no training image left in 'shapes_coco_train': of its 8 images, 8 "
        "unreadable ones are skipped (DATALOADER.SKIP_CORRUPT_IMAGES True)",
    )  # fmt: skip


def test_every_box_degenerate_with_filter_empty_annotations(workdir):
    def change(data):
        for i, ann in enumerate(data["annotations"]):
            ann["bbox"] = [5, 5, 0, 7] if i % 2 else [70, 3, 5, 5]  # zero width, outside

    edit_json(workdir, TRAIN_JSON, change)
    proc = train_net(workdir, "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "True")
    assert_refused(
        proc, workdir, "no training image left in 'shapes_coco_train': of its 8 images, 8 without "
        "a box of positive size inside the image are dropped (DATALOADER.FILTER_EMPTY_ANNOTATIONS",
    )  # fmt: skip
    proc = train_net(workdir, "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False", *STOP_AFTER_CHECK)
    assert_refused(proc, workdir, STOPPED_AFTER_CHECK)
    warning = "training set 'shapes_coco_train' has no box of positive size inside its image (8 "
    assert warning in proc.stdout


def test_a_training_set_with_some_boxes_gives_no_warning(workdir):
    proc = train_net(workdir, "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False", *STOP_AFTER_CHECK)
    assert_refused(proc, workdir, STOPPED_AFTER_CHECK)
    assert "has no box" not in proc.stdout and "cannot be read" not in proc.stdout


def test_nothing_of_detectron2_on_stderr_before_the_error(workdir, tmp_path):
    """A dataset name without "coco" and category ids 2, 5, 7, 9 (detectron2 warns that it maps
    them), a CUDA toolkit but no GPU (torch warns "No CUDA runtime" when detectron2 collects the
    environment), a missing image: only the error line."""
    cuda = tmp_path / "cuda"
    (cuda / "bin").mkdir(parents=True)
    config = tmp_path / "mine.yaml"
    config.write_text(
        f'_BASE_: "{REPO_ROOT}/configs/Demo/shapes_retinanet.yaml"\n'
        f'DATASETS:\n  COCO_INSTANCES: [["my_train", "{TRAIN_JSON}", "datasets/shapes_coco/train"],'
        f' ["my_val", "{VAL_JSON}", "datasets/shapes_coco/val"]]\n'
        '  TRAIN: ("my_train",)\n  TEST: ("my_val",)\nMODEL:\n  RETINANET:\n    NUM_CLASSES: 4\n'
    )
    (workdir / "datasets/shapes_coco/train/000004.jpg").unlink()
    proc = train_net(workdir, config=str(config), CUDA_HOME=str(cuda))
    assert_refused(
        proc, workdir, f"dataset 'my_train': {TRAIN_JSON}: image id 5: file not found: "
        "datasets/shapes_coco/train/000004.jpg",
    )  # fmt: skip


def test_second_run_reads_the_check_from_the_cache(workdir):
    proc = train_net(workdir, *STOP_AFTER_CHECK)
    assert_refused(proc, workdir, STOPPED_AFTER_CHECK)
    cached = list((workdir / "cache/dataset_checks").iterdir())
    assert len(cached) == 2  # one per json
    # images damaged in place (the folder unchanged) are not seen: the cached result is used
    for path in (workdir / "datasets/shapes_coco/train").iterdir():
        path.write_bytes(path.read_bytes()[:100])
    assert_refused(train_net(workdir, *STOP_AFTER_CHECK), workdir, STOPPED_AFTER_CHECK)
    # a changed json is checked again
    edit_json(workdir, TRAIN_JSON, lambda d: d["images"][0].update(width=63))
    assert_refused(train_net(workdir), workdir, "image id 1: cannot read")


def test_eval_only_checks_the_test_set(workdir):
    """--eval-only reads DATASETS.TEST only: a size mismatch there is refused before anything is
    written; a broken training set does not matter."""
    from detectron2.modeling import build_model

    from san_det.config import get_san_det_cfg
    from san_det.detection import DetectorCheckpointer
    from san_det.engine.checkpoint import checkpointer_options

    cfg = get_san_det_cfg(CONFIG, ["MODEL.DEVICE", "cpu"])
    DetectorCheckpointer(
        build_model(cfg), str(workdir / "weights"), **checkpointer_options(cfg)
    ).save("model_final", iteration=0)
    edit_json(workdir, VAL_JSON, lambda d: d["images"][1].update(height=32))
    edit_json(workdir, TRAIN_JSON, lambda d: d.pop("images"))
    proc = train_net(workdir, "--eval-only", "MODEL.WEIGHTS", "weights/model_final.pth")
    assert_refused(
        proc, workdir, f"dataset 'shapes_coco_val': {VAL_JSON}: image id 2: "
        "datasets/shapes_coco/val/000001.jpg is 64x64 (width x height, after its EXIF "
        "orientation) but the json says 64x32",
    )  # fmt: skip


def test_predict_checks_the_json_it_reads_the_classes_from(workdir):
    edit_json(workdir, VAL_JSON, lambda d: d["categories"][2].update(id=9))
    (workdir / "model.pth").write_bytes(b"")  # the json is read before the weights
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools/predict.py"), "--config-file", CONFIG,
         "--input", "datasets/shapes_coco/val", "--output", "predicted",
         "MODEL.WEIGHTS", "model.pth"],
        cwd=workdir, capture_output=True, text=True, timeout=600,
        env=child_env(SAN_DET_CACHE=str(workdir / "cache")),
    )  # fmt: skip
    assert_one_line_error(
        proc, f"dataset 'shapes_coco_val': {VAL_JSON}: category id 9 is used twice ('star' and "
        "'triangle')", script="predict.py",
    )  # fmt: skip
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (workdir / "predicted").exists()


def test_area_is_needed_in_test_sets_only(workdir):
    """COCO evaluation reads each ground-truth annotation's area (a KeyError after training)."""
    edit_json(workdir, TRAIN_JSON, lambda d: d["annotations"][0].pop("area"))
    assert_refused(train_net(workdir, *STOP_AFTER_CHECK), workdir, STOPPED_AFTER_CHECK)
    edit_json(workdir, VAL_JSON, lambda d: d["annotations"][0].pop("area"))
    assert_refused(
        train_net(workdir), workdir, f"dataset 'shapes_coco_val': {VAL_JSON}: annotation id 1: "
        "no 'area' (COCO evaluation reads each annotation's area)",
    )  # fmt: skip
