"""train_net.py's pre-flight for what the config says about data and the solver: a _BASE_ cycle,
solver values torch refuses, CLASSIFICATION.IMAGENET_ROOT, the NUM_CLASSES message, the README's
command-line example for your own COCO data. One line on stderr, exit 2, no OUTPUT_DIR."""

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers.paths import REPO_ROOT
from tests.helpers.scripts import assert_one_line_error, child_env

pytestmark = pytest.mark.slow

SHAPES_CONFIG = str(REPO_ROOT / "configs/Demo/shapes_retinanet.yaml")


def train_net(cwd, *args, **env):
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_net.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
        env=child_env(SAN_DET_CACHE=str(cwd / "cache"), **env),
    )  # fmt: skip


def assert_refused(proc, cwd, *fragments):
    assert_one_line_error(proc, *fragments)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert not (cwd / "out").exists()


@pytest.mark.parametrize("length", [1, 3])
def test_base_cycle_is_one_line(tmp_path, length):
    names = [f"c{i}.yaml" for i in range(length)]
    for i, name in enumerate(names):
        (tmp_path / name).write_text(f'_BASE_: "{names[(i + 1) % length]}"\n')
    proc = train_net(tmp_path, "--config-file", "c0.yaml", "OUTPUT_DIR", "out")
    loop = " -> ".join(names + names[:1])
    assert_refused(proc, tmp_path, f"config file c0.yaml: _BASE_ cycle: {loop}")


@pytest.mark.parametrize(
    "key, value",
    [("SOLVER.BASE_LR", "-0.01"), ("SOLVER.MOMENTUM", "-0.9"),
     ("SOLVER.WEIGHT_DECAY", "-1e-4"), ("SOLVER.WEIGHT_DECAY_NORM", "-1.0")],
)  # fmt: skip
def test_solver_values_the_optimizer_refuses(tmp_path, key, value):
    proc = train_net(tmp_path, "--config-file", SHAPES_CONFIG, key, value, "OUTPUT_DIR", "out")
    assert_refused(proc, tmp_path, f"{key} must be a number >= 0, got {float(value)}")


def test_nan_learning_rate_in_a_config_file(tmp_path):
    (tmp_path / "nan.yaml").write_text(f'_BASE_: "{SHAPES_CONFIG}"\nSOLVER:\n  BASE_LR: .nan\n')
    proc = train_net(tmp_path, "--config-file", "nan.yaml", "OUTPUT_DIR", "out")
    assert_refused(proc, tmp_path, "SOLVER.BASE_LR must be a number >= 0, got nan")


def _imagenet(root, classes=("ant", "bee")):
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for k in range(2):
                pixels = np.full((40, 40, 3), 60 * k, np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{k}.png")


def test_imagenet_root_takes_effect_before_the_checks(tmp_path):
    """docs/IMAGENET.md: ImageNet may come from CLASSIFICATION.IMAGENET_ROOT. The pre-flight
    reads that folder (its 2 classes against NUM_CLASSES 5), not $DETECTRON2_DATASETS/imagenet."""
    _imagenet(tmp_path / "my_imagenet")
    (tmp_path / "empty").mkdir()
    proc = train_net(
        tmp_path, "--config-file", str(REPO_ROOT / "configs/ImageNet/embedded_cpu_demo.yaml"),
        "DATASETS.TRAIN", "('imagenet_train',)", "DATASETS.TEST", "('imagenet_val',)",
        "CLASSIFICATION.IMAGENET_ROOT", str(tmp_path / "my_imagenet"),
        "CLASSIFICATION.NUM_CLASSES", "5", "OUTPUT_DIR", "out",
        DETECTRON2_DATASETS=str(tmp_path / "empty"),
    )  # fmt: skip
    assert_refused(proc, tmp_path, "has 2 classes but CLASSIFICATION.NUM_CLASSES is 5")


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """data/train.json, data/val.json and their image folders, as the README names them."""
    folder = tmp_path_factory.mktemp("own_data")
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools/make_coco_example.py"), "--output",
         str(folder / "example"), "--num-train", "4", "--num-val", "2", "--image-size", "64"],
        capture_output=True, text=True, env=child_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (folder / "data").mkdir()
    for split in ("train", "val"):
        json_file = folder / f"example/annotations/instances_{split}.json"
        shutil.copy(json_file, folder / f"data/{split}.json")
        shutil.copytree(folder / f"example/{split}", folder / f"data/{split}")
    return folder


def _readme_command_line_example():
    """The KEY VALUE pairs of the README's command-line example for your own COCO data."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Train on your own COCO data", 1)[1]
    section = section.split("or on the command line", 1)[1]
    line = re.search(r"`(DATASETS\.COCO_INSTANCES [^`]*)`", section)
    assert line, "the README's command-line example moved"
    return re.findall(r'"[^"]*"|\S+', line.group(1))


def test_readme_command_line_example_trains_and_tests_on_your_data(own_data, tmp_path):
    """The example sets DATASETS.TEST (else the base config's 3-class shapes_val is kept) and the
    class count: with the README's opts the datasets pass every check; with NUM_CLASSES 3 the
    message names each dataset with its count."""
    cwd = tmp_path
    shutil.copytree(own_data / "data", cwd / "data")
    opts = [o.strip('"') for o in _readme_command_line_example()]
    assert "DATASETS.TEST" in opts
    proc = train_net(
        cwd, "--config-file", SHAPES_CONFIG, *opts, "MODEL.RETINANET.NUM_CLASSES", "3",
        "OUTPUT_DIR", "out",
    )  # fmt: skip
    assert_refused(
        proc, cwd, "MODEL.RETINANET.NUM_CLASSES is 3 but dataset 'my_val' has 4 and dataset "
        "'my_train' has 4 categories (circle, square, star, triangle;",
        "set MODEL.RETINANET.NUM_CLASSES 4",
    )  # fmt: skip


def test_train_and_test_sets_with_different_categories_are_named_with_their_counts(
    own_data, tmp_path
):
    """The demo's shapes_val (3 classes) kept as test set: whatever NUM_CLASSES, one message
    naming both datasets and counts (it used to send the user back and forth)."""
    shutil.copytree(own_data / "data", tmp_path / "data")
    for num_classes in ("3", "4"):
        proc = train_net(
            tmp_path, "--config-file", SHAPES_CONFIG, "DATASETS.COCO_INSTANCES",
            "[['my_train', 'data/train.json', 'data/train']]", "DATASETS.TRAIN", "('my_train',)",
            "MODEL.RETINANET.NUM_CLASSES", num_classes, "OUTPUT_DIR", "out",
        )  # fmt: skip
        assert_refused(
            proc, tmp_path, "the datasets of DATASETS.TRAIN / DATASETS.TEST have different "
            "categories: 'shapes_val' has 3 (circle, square, triangle); 'my_train' has 4 "
            "(circle, square, star, triangle)",
        )  # fmt: skip
