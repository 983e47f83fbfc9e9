"""The COCO format check (every class of malformed input), image sizes as detectron2 reads them,
and the cache of the dataset check."""

import copy
import json

import numpy as np
import pytest
from detectron2.data.detection_utils import read_image
from PIL import Image

from san_det.data import coco_checks
from san_det.data.coco_checks import check_coco_dataset, find_coco_problems, read_image_size
from san_det.data.coco_format import check_coco_content
from san_det.data.mapper import read_image_robust
from san_det.errors import DatasetError

VALID = {
    "images": [
        {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": "b.jpg", "width": 32.0, "height": 32},
    ],
    "annotations": [
        {"id": 10, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 10], "iscrowd": 0},
        {"id": 11, "image_id": 2, "category_id": 5, "bbox": [0.5, 0, 4, 4.5],
         "segmentation": [[0, 0, 4, 0, 4, 4]]},
        {"id": 12, "image_id": 2, "category_id": 5, "bbox": [40, 40, 4, 4]},  # outside: no box
        {"id": 13, "image_id": 1, "category_id": 5, "bbox": [3, 3, 0, 4]},  # zero width: no box
        {"id": 14, "image_id": 1, "category_id": 5, "bbox": [3, 3, 5, -4]},  # negative: no box
        {"id": 15, "image_id": 1, "category_id": 5, "bbox": [3, 3, 5, 4], "iscrowd": 1},  # crowd
    ],
    "categories": [{"id": 3, "name": "cat"}, {"id": 5, "name": "dog"}],
}  # fmt: skip


def test_a_valid_file_has_no_problem_and_its_boxes_are_counted():
    content = check_coco_content(copy.deepcopy(VALID))
    assert content.problems == []
    assert len(content.without_area) == 6  # VALID has no areas: a problem for evaluation only
    assert [i.image_id for i in content.images] == [1, 2]
    assert content.boxed_image_ids == {1, 2} and content.num_boxes == 2


def _set(path, value):
    def change(data):
        *parents, last = path
        target = data
        for key in parents:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value

    return change


MALFORMED = [
    # top level
    (lambda d: d.clear() or d.update(x=1), "no 'images' key"),
    (_set(("categories",), "cats"), "'categories' is a str, not a list"),
    (_set(("annotations",), None), "'annotations' is a NoneType, not a list"),
    (_set(("categories",), []), "'categories' is empty"),
    # ids
    (_set(("images", 1, "id"), 1), "image id 1 is used twice ('a.jpg' and 'b.jpg')"),
    (_set(("images", 0, "id"), "1"), "images[0]: id '1' is not an integer"),
    (_set(("images", 0, "id"), True), "images[0]: id True is not an integer"),
    (_set(("images", 0, "id"), KeyError), "images[0] has no 'id'"),
    (_set(("images", 0), [1, 2]), "images[0] is [1, 2], not an object"),
    (_set(("categories", 1, "id"), 3), "category id 3 is used twice ('cat' and 'dog')"),
    (_set(("categories", 0, "id"), 2.5), "categories[0]: id 2.5 is not an integer"),
    (_set(("annotations", 1, "id"), 10), "annotation id 10 is used twice"),
    (_set(("annotations", 0, "id"), None), "annotations[0]: id None is not an integer"),
    # images
    (_set(("images", 0, "width"), "64"), "image id 1: width '64' is not a positive integer"),
    (_set(("images", 0, "height"), -48), "image id 1: height -48 is not a positive integer"),
    (_set(("images", 0, "width"), 64.5), "image id 1: width 64.5 is not a positive integer"),
    (_set(("images", 0, "height"), KeyError), "image id 1: no 'height'"),
    (_set(("images", 0, "file_name"), ""), "image id 1: file_name '' is not a non-empty string"),
    (_set(("images", 0, "file_name"), 7), "image id 1: file_name 7 is not a non-empty string"),
    # categories
    (_set(("categories", 0, "name"), KeyError), "category id 3: name None is not a non-empty"),
    # annotations
    (_set(("annotations", 0, "image_id"), 7), "annotation id 10: image_id 7 is not the id of an"),
    (_set(("annotations", 0, "image_id"), "1"), "annotation id 10: image_id '1' is not the id"),
    (_set(("annotations", 0, "image_id"), KeyError), "annotation id 10: no 'image_id'"),
    (_set(("annotations", 0, "category_id"), 4), "annotation id 10: category_id 4 is not the id"),
    (_set(("annotations", 0, "category_id"), KeyError), "annotation id 10: no 'category_id'"),
    (_set(("annotations", 0, "bbox"), KeyError), "annotation id 10: no 'bbox'"),
    (_set(("annotations", 0, "bbox"), None), "annotation id 10: bbox None is not a list"),
    (_set(("annotations", 0, "bbox"), "1 2 3 4"), "bbox '1 2 3 4' is not a list"),
    (_set(("annotations", 0, "bbox"), {"x": 1}), "bbox {'x': 1} is not a list"),
    (_set(("annotations", 0, "bbox"), [1, 2, 3]), "bbox [1, 2, 3] has 3 numbers, not 4"),
    (_set(("annotations", 0, "bbox"), [1, 2, 3, 4, 5]), "has 5 numbers, not 4"),
    (_set(("annotations", 0, "bbox"), []), "bbox [] has 0 numbers, not 4"),
    (_set(("annotations", 0, "bbox"), ["1", 2, 3, 4]), "holds a value that is not a number"),
    (_set(("annotations", 0, "bbox"), [1, None, 3, 4]), "holds a value that is not a number"),
    (_set(("annotations", 0, "bbox"), [1, 2, False, 4]), "holds a value that is not a number"),
    (_set(("annotations", 0, "bbox"), [[1], 2, 3, 4]), "holds a value that is not a number"),
    (_set(("annotations", 0, "bbox"), [1, float("nan"), 3, 4]), "holds NaN or infinity"),
    (_set(("annotations", 0, "bbox"), [1, 2, float("inf"), 4]), "holds NaN or infinity"),
    (_set(("annotations", 0, "iscrowd"), 2), "annotation id 10: iscrowd 2 is not 0 or 1"),
    (_set(("annotations", 0, "area"), "10"), "annotation id 10: area '10' is not a number >= 0"),
    (_set(("annotations", 0, "area"), -1), "annotation id 10: area -1 is not a number >= 0"),
    (_set(("annotations", 0, "area"), float("nan")), "area nan is not a number >= 0"),
    (_set(("annotations", 0, "iscrowd"), "no"), "iscrowd 'no' is not 0 or 1"),
    (_set(("annotations", 0, "segmentation"), "poly"), "segmentation 'poly' is neither"),
    (_set(("annotations", 0, "segmentation"), [["a"]]), "segmentation [['a']] is neither"),
    (_set(("annotations", 0), "ann"), "annotations[0] is 'ann', not an object"),
]


@pytest.mark.parametrize("change, message", MALFORMED)
def test_every_class_of_malformed_input_is_named(change, message):
    data = copy.deepcopy(VALID)
    change(data)
    problems = check_coco_content(data).problems
    assert problems, message
    assert message in problems[0].text, problems


def test_not_an_object():
    assert "holds a list, not an object" in check_coco_content([1, 2]).problems[0].text


def _save(path, size, orientation=None, noise=False):
    pixels = np.full((size[1], size[0], 3), 100, np.uint8)
    if noise:  # pixel data far larger than the header
        pixels = np.random.default_rng(0).integers(0, 256, pixels.shape, np.uint8)
    image = Image.fromarray(pixels)
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    image.save(path, **kwargs)


@pytest.mark.parametrize(
    "ext, orientation",
    [(ext, o) for ext in (".jpg", ".png", ".webp") for o in (None, 1, 2, 3, 4, 5, 6, 7, 8)]
    + [(".bmp", None), (".tif", 6)],
)
def test_image_size_is_the_size_the_run_reads(tmp_path, orientation, ext):
    """The mapper's reader (EXIF orientation applied), and detectron2's for JPEG, PNG, WebP."""
    path = str(tmp_path / f"x{ext}")
    _save(path, (37, 21), orientation)
    height, width = read_image_robust(path).shape[:2]
    assert read_image_size(path) == (width, height)
    assert (width, height) == ((21, 37) if orientation in (5, 6, 7, 8) else (37, 21))
    if ext != ".tif":  # detectron2 0.6 reads no orientation from a TIFF's own tags
        assert read_image(path).shape[:2] == (height, width)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp", ".bmp"])
def test_truncated_image_files_are_unreadable(tmp_path, ext):
    path = tmp_path / f"x{ext}"
    _save(str(path), (64, 64), noise=True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    if ext in (".jpg", ".png"):  # read without decoding: the header is whole, the end missing
        with Image.open(path) as image:
            assert image.size == (64, 64)
    with pytest.raises(OSError):
        read_image(str(path))  # detectron2 cannot read it either
    with pytest.raises(OSError):
        read_image_size(str(path))


def _dataset(tmp_path, n=4):
    root = tmp_path / "images"
    root.mkdir()
    images, annotations = [], []
    for i in range(n):
        _save(str(root / f"{i}.jpg"), (40, 30))
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": 40, "height": 30})
        annotations.append(
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25,
             "iscrowd": 0}
        )
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}
    json_file = tmp_path / "train.json"
    json_file.write_text(json.dumps(data))
    return str(json_file), str(root)


def test_results_are_cached_per_json(tmp_path, monkeypatch):
    monkeypatch.setenv("SAN_DET_CACHE", str(tmp_path / "cache"))
    json_file, root = _dataset(tmp_path)
    calls = []
    real = coco_checks.read_image_size
    monkeypatch.setattr(coco_checks, "read_image_size", lambda p: calls.append(p) or real(p))
    first = find_coco_problems(json_file, root)
    assert len(calls) == 4 and first.num_images == 4 and first.problems == []
    assert find_coco_problems(json_file, root) == first
    assert len(calls) == 4  # from the cache
    (tmp_path / "images/extra.jpg").write_bytes(b"")  # the folder changed: checked again
    find_coco_problems(json_file, root)
    assert len(calls) == 8


def test_a_cached_problem_is_looked_at_again_once_its_file_changed(tmp_path, monkeypatch):
    monkeypatch.setenv("SAN_DET_CACHE", str(tmp_path / "cache"))
    json_file, root = _dataset(tmp_path)
    good = (tmp_path / "images/2.jpg").read_bytes()
    (tmp_path / "images/2.jpg").write_bytes(good[:200])
    with pytest.raises(DatasetError, match=r"image id 3: cannot read .*2\.jpg"):
        check_coco_dataset("d", json_file, root)
    with pytest.raises(DatasetError, match="image id 3"):  # from the cache
        check_coco_dataset("d", json_file, root)
    (tmp_path / "images/2.jpg").write_bytes(good)
    counts = check_coco_dataset("d", json_file, root, training=True)
    assert counts.usable == 4 and counts.boxes == 4


def test_an_unwritable_cache_is_no_error(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file, not a folder")
    monkeypatch.setenv("SAN_DET_CACHE", str(tmp_path / "cache"))
    json_file, root = _dataset(tmp_path)
    assert find_coco_problems(json_file, root).num_images == 4


def test_skip_corrupt_images_applies_to_training_sets_only(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SAN_DET_CACHE", str(tmp_path / "cache"))
    json_file, root = _dataset(tmp_path)
    (tmp_path / "images/1.jpg").unlink()
    counts = check_coco_dataset("d", json_file, root, training=True, skip_corrupt_images=True)
    assert counts.usable == 3 and counts.skipped == 1
    assert "'d': 1 of 4 images cannot be read and are skipped" in caplog.text
    with pytest.raises(DatasetError, match="image id 2: file not found"):
        check_coco_dataset("d", json_file, root, training=False, skip_corrupt_images=True)


def test_area_is_needed_where_the_dataset_is_evaluated(tmp_path, monkeypatch):
    """pycocotools' COCOeval reads every ground-truth annotation's area; training does not."""
    monkeypatch.setenv("SAN_DET_CACHE", str(tmp_path / "cache"))
    json_file, root = _dataset(tmp_path)
    data = json.loads(open(json_file).read())
    del data["annotations"][1]["area"]
    data["annotations"][2]["area"] = "big"
    with open(json_file, "w") as f:
        json.dump(data, f)
    with pytest.raises(DatasetError, match="annotation id 3: area 'big' is not a number >= 0$"):
        check_coco_dataset("d", json_file, root, training=True, evaluated=False)
    data["annotations"][2]["area"] = 25.0
    with open(json_file, "w") as f:
        json.dump(data, f)
    check_coco_dataset("d", json_file, root, training=True, evaluated=False)
    with pytest.raises(DatasetError, match="annotation id 2: no 'area' .COCO evaluation reads"):
        check_coco_dataset("d", json_file, root, training=True, evaluated=True)
