"""Tests of the synthetic shapes dataset: files, determinism, atomicity, detectron2 integration."""

import contextlib
import io
import json
import multiprocessing
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import san_det  # noqa: F401  (patches detectron2 before it is imported)
from san_det.data.shapes import (
    SHAPE_CLASSES,
    catalog,
    default_shapes_root,
    ensure_shapes_dataset,
    generate,
    generate_shapes_dataset,
    register_shapes_datasets,
    render_shapes_image,
    writer,
)

SMALL = dict(split="train", num_images=6, image_size=64, seed=3)


def _generate(root, **overrides):
    return generate_shapes_dataset(str(root), **dict(SMALL, **overrides))


def _read_bytes(split_dir):
    files = {"annotations.json": open(os.path.join(split_dir, "annotations.json"), "rb").read()}
    for name in sorted(os.listdir(os.path.join(split_dir, "images"))):
        with open(os.path.join(split_dir, "images", name), "rb") as f:
            files[name] = f.read()
    return files


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = _read_bytes(os.path.dirname(_generate(tmp_path / "a")))
    b = _read_bytes(os.path.dirname(_generate(tmp_path / "b")))
    c = _read_bytes(os.path.dirname(_generate(tmp_path / "c", seed=4)))
    assert len(a) == SMALL["num_images"] + 1
    assert a == b
    assert a.keys() == c.keys()
    assert a["annotations.json"] != c["annotations.json"]
    assert all(a[name] != c[name] for name in a if name.endswith(".jpg"))


def test_coco_json_is_valid_and_boxes_lie_inside_images(tmp_path):
    from pycocotools.coco import COCO

    json_file = _generate(tmp_path, num_images=12, image_size=(48, 80), max_objects=5)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(json_file)
    categories = coco.loadCats(coco.getCatIds())
    assert [(c["id"], c["name"]) for c in categories] == [
        (1, "circle"),
        (2, "square"),
        (3, "triangle"),
    ]
    assert len(coco.getImgIds()) == 12
    annotations = coco.loadAnns(coco.getAnnIds())
    assert len(annotations) >= 12
    assert len({a["id"] for a in annotations}) == len(annotations)
    seen_categories = set()
    for ann in annotations:
        image = coco.loadImgs(ann["image_id"])[0]
        assert (image["height"], image["width"]) == (48, 80)
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and ann["area"] > 0 and ann["iscrowd"] == 0
        assert x >= 0 and y >= 0 and x + w <= 80 + 1e-6 and y + h <= 48 + 1e-6
        assert ann["area"] <= w * h + 0.1
        polygon = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
        assert len(polygon) >= 3
        # The polygon lies in the box and spans it (a circle's 32-gon falls short by < 1%).
        assert np.all(polygon.min(axis=0) >= [x - 0.01, y - 0.01])
        assert np.all(polygon.max(axis=0) <= [x + w + 0.01, y + h + 0.01])
        span = polygon.max(axis=0) - polygon.min(axis=0)
        assert np.all(span >= 0.99 * np.array([w, h]) - 0.02)
        seen_categories.add(ann["category_id"])
    assert seen_categories == {1, 2, 3}
    for image in coco.loadImgs(coco.getImgIds()):
        path = os.path.join(os.path.dirname(json_file), "images", image["file_name"])
        with Image.open(path) as pil:
            assert pil.format == "JPEG" and pil.mode == "RGB" and pil.size == (80, 48)


def test_rendered_coverage_matches_the_annotated_geometry():
    for seed in range(8):
        pixels, painted = render_shapes_image(np.random.default_rng(seed), (72, 56), 4, 10, 40, 0.3)
        assert pixels.shape == (72, 56, 3) and pixels.dtype == np.uint8
        assert painted
        for shape in painted:
            x0, y0, x1, y1 = shape.window
            alpha = shape.alpha
            assert alpha.shape == (y1 - y0, x1 - x0)
            assert alpha.min() >= 0 and alpha.max() == 1
            # 4x4 supersampling: area within 2%, centroid within 0.1 px of the exact shape's.
            assert abs(alpha.sum() - shape.area) <= 0.02 * shape.area
            cx = (alpha.sum(axis=0) * (np.arange(x0, x1) + 0.5)).sum() / alpha.sum()
            cy = (alpha.sum(axis=1) * (np.arange(y0, y1) + 0.5)).sum() / alpha.sum()
            if SHAPE_CLASSES[shape.category] == "circle":
                centre = (shape.bbox[0] + shape.bbox[2]) / 2, (shape.bbox[1] + shape.bbox[3]) / 2
            else:
                p, q = shape.polygon, np.roll(shape.polygon, -1, axis=0)
                cross = p[:, 0] * q[:, 1] - q[:, 0] * p[:, 1]
                centre = ((p + q) * cross[:, None]).sum(axis=0) / (3 * cross.sum())
            assert abs(cx - centre[0]) < 0.1 and abs(cy - centre[1]) < 0.1
            # The painted pixels reach the box's edges (a corner entering a pixel by less than
            # the 1/4 px sample spacing may cover none of its samples).
            ys, xs = np.nonzero(alpha > 0)
            assert shape.bbox[0] - 1 < x0 + xs.min() <= shape.bbox[0] + 0.75
            assert shape.bbox[1] - 1 < y0 + ys.min() <= shape.bbox[1] + 0.75
            assert shape.bbox[2] - 0.75 <= x0 + xs.max() + 1 < shape.bbox[2] + 1
            assert shape.bbox[3] - 0.75 <= y0 + ys.max() + 1 < shape.bbox[3] + 1


def test_negative_fraction_gives_exactly_that_many_empty_images(tmp_path):
    json_file = _generate(tmp_path, num_images=8, negative_fraction=0.25)
    coco = json.load(open(json_file))
    annotated = {a["image_id"] for a in coco["annotations"]}
    assert len(coco["images"]) - len(annotated) == 2


def test_detectron2_catalogs_loader_mapper_and_evaluator(tmp_path):
    from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, BoxMode, Instances

    prefix = "test_shapes_catalog"
    names = register_shapes_datasets(
        str(tmp_path), image_size=64, num_train=5, num_val=4, seed=7, prefix=prefix
    )
    try:
        assert names == [f"{prefix}_train", f"{prefix}_val"]
        assert [catalog._registered[name]["seed"] for name in names] == [7, 8]
        assert not os.path.exists(tmp_path / "train")  # registration is lazy
        metadata = MetadataCatalog.get(f"{prefix}_val")
        assert metadata.thing_classes == list(SHAPE_CLASSES)
        assert len(metadata.thing_colors) == len(SHAPE_CLASSES)
        assert metadata.evaluator_type == "coco"
        assert metadata.json_file == str(tmp_path / "val" / "annotations.json")
        assert metadata.image_root == str(tmp_path / "val" / "images")

        dicts = DatasetCatalog.get(f"{prefix}_val")
        assert len(dicts) == 4 and os.path.isfile(metadata.json_file)
        for record in dicts:
            assert {"file_name", "height", "width", "image_id", "annotations"} <= set(record)
            assert os.path.isfile(record["file_name"]) and (record["height"], record["width"]) == (
                64,
                64,
            )
            for ann in record["annotations"]:
                assert ann["bbox_mode"] == BoxMode.XYWH_ABS
                assert ann["category_id"] in range(len(SHAPE_CLASSES))
        assert metadata.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}

        mapper = DatasetMapper(is_train=True, augmentations=[], image_format="BGR")
        mapped = mapper(dicts[0])
        assert mapped["image"].shape == (3, 64, 64)
        expected = [
            BoxMode.convert(a["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
            for a in dicts[0]["annotations"]
        ]
        assert torch.allclose(
            mapped["instances"].gt_boxes.tensor, torch.tensor(expected), atol=1e-4
        )

        # Ground truth given as predictions scores AP 100 through detectron2's COCOEvaluator.
        evaluator = COCOEvaluator(f"{prefix}_val", distributed=False, use_fast_impl=False)
        evaluator.reset()
        for record in dicts:
            instances = Instances((64, 64))
            boxes = [
                BoxMode.convert(a["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
                for a in record["annotations"]
            ]
            instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
            instances.scores = torch.ones(len(boxes))
            instances.pred_classes = torch.tensor(
                [a["category_id"] for a in record["annotations"]], dtype=torch.int64
            )
            evaluator.process([{"image_id": record["image_id"]}], [{"instances": instances}])
        with contextlib.redirect_stdout(io.StringIO()):
            results = evaluator.evaluate()
        assert results["bbox"]["AP50"] == pytest.approx(100.0)
        assert results["bbox"]["AP"] == pytest.approx(100.0)

        assert ensure_shapes_dataset(f"{prefix}_train") == str(
            tmp_path / "train" / "annotations.json"
        )
    finally:
        for name in names:
            DatasetCatalog.pop(name, None)
            MetadataCatalog.pop(name, None)
            catalog._registered.pop(name, None)


def test_default_datasets_are_registered():
    from detectron2.data import DatasetCatalog, MetadataCatalog

    assert {"shapes_train", "shapes_val"} <= set(DatasetCatalog.list())
    assert MetadataCatalog.get("shapes_train").thing_classes == list(SHAPE_CLASSES)
    train, val = catalog._registered["shapes_train"], catalog._registered["shapes_val"]
    assert (train["num_images"], val["num_images"]) == (1000, 200)
    assert train["image_size"] == val["image_size"] == 128
    assert train["seed"] != val["seed"]
    assert train["negative_fraction"] > 0
    with pytest.raises(KeyError, match="not a registered shapes dataset"):
        ensure_shapes_dataset("coco_2017_val")


def test_leftover_temporary_and_incomplete_directories_are_not_taken_as_complete(tmp_path):
    # What an interrupted (killed) run leaves: a temporary directory with partial content, and a
    # split directory that somehow lacks its manifest.
    leftover = tmp_path / ".train.tmp-12345-deadbeef"
    (leftover / "images").mkdir(parents=True)
    (leftover / "annotations.json").write_text("{}")
    (tmp_path / "train" / "images").mkdir(parents=True)
    (tmp_path / "train" / "annotations.json").write_text('{"images": []}')
    json_file = _generate(tmp_path)
    assert not leftover.exists()
    assert len(json.load(open(json_file))["images"]) == SMALL["num_images"]
    assert len(os.listdir(tmp_path / "train" / "images")) == SMALL["num_images"]
    assert sorted(p for p in os.listdir(tmp_path) if not p.endswith(".lock")) == ["train"]


def test_interrupted_generation_leaves_no_split_behind(tmp_path, monkeypatch):
    calls = []
    original = writer.render_shapes_image

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(writer, "render_shapes_image", failing)
    with pytest.raises(KeyboardInterrupt):
        _generate(tmp_path)
    assert sorted(p for p in os.listdir(tmp_path) if not p.endswith(".lock")) == []
    monkeypatch.setattr(writer, "render_shapes_image", original)
    assert len(json.load(open(_generate(tmp_path)))["images"]) == SMALL["num_images"]


def test_manifest_mismatch_triggers_regeneration_and_match_reuses(tmp_path, monkeypatch):
    json_file = _generate(tmp_path)
    split_dir = os.path.dirname(json_file)
    marker = os.path.join(split_dir, "marker")
    open(marker, "w").close()
    assert _generate(tmp_path) == json_file
    assert os.path.exists(marker)  # same parameters: reused

    monkeypatch.setattr(writer, "GENERATOR_VERSION", writer.GENERATOR_VERSION + 100)
    _generate(tmp_path)
    assert not os.path.exists(marker)  # other generator version: regenerated
    assert (
        json.load(open(os.path.join(split_dir, "manifest.json")))["version"]
        == writer.GENERATOR_VERSION
    )

    open(marker, "w").close()
    _generate(tmp_path, num_images=4)  # other parameters: regenerated
    assert not os.path.exists(marker)
    assert len(json.load(open(json_file))["images"]) == 4
    assert len(os.listdir(os.path.join(split_dir, "images"))) == 4


def test_concurrent_generation_runs_once_and_all_callers_get_it(tmp_path, monkeypatch):
    runs = []
    original = generate.write_split

    def counted(*args, **kwargs):
        runs.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(generate, "write_split", counted)
    results, errors = [], []

    def worker():
        try:
            results.append(_generate(tmp_path))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(runs) == 1
    assert (
        len(set(results)) == 1 and len(json.load(open(results[0]))["images"]) == SMALL["num_images"]
    )


def _generate_logged(root, log):
    original = generate.write_split

    def logged(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return original(*args, **kwargs)

    generate.write_split = logged
    _generate(root)


@pytest.mark.skipif(generate.fcntl is None, reason="cross-process lock needs fcntl (POSIX)")
def test_concurrent_processes_generate_once(tmp_path):
    context = multiprocessing.get_context("fork")
    log = tmp_path / "runs.log"
    processes = [
        context.Process(target=_generate_logged, args=(str(tmp_path / "root"), str(log)))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [p.exitcode for p in processes] == [0, 0]
    assert len(log.read_text().split()) == 1
    json_file = tmp_path / "root" / "train" / "annotations.json"
    assert len(json.load(open(json_file))["images"]) == SMALL["num_images"]


@pytest.mark.parametrize(
    "overrides, argument",
    [
        (dict(num_images=0), "num_images"),
        (dict(num_images=-3), "num_images"),
        (dict(image_size=0), "image_size"),
        (dict(image_size=(64, -1)), "image_size"),
        (dict(image_size=(64, 64, 3)), "image_size"),
        (dict(seed=-1), "seed"),
        (dict(min_size=0), "min_size"),
        (dict(min_size=20, max_size=10), "max_size"),
        (dict(max_size=65), "max_size"),
        (dict(min_objects=0), "min_objects"),
        (dict(min_objects=3, max_objects=2), "max_objects"),
        (dict(negative_fraction=1.5), "negative_fraction"),
        (dict(max_overlap=-0.1), "max_overlap"),
        (dict(jpeg_quality=0), "jpeg_quality"),
        (dict(split="../x"), "split"),
        (dict(split=""), "split"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(tmp_path, overrides, argument):
    with pytest.raises(ValueError, match=argument):
        _generate(tmp_path, **overrides)
    assert not os.listdir(tmp_path)


def test_unwritable_root_names_the_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    root = blocker / "shapes"
    with pytest.raises(OSError, match="a_file"):
        _generate(root)
    with pytest.raises(ValueError, match="num_images"):  # arguments are checked first
        register_shapes_datasets(str(root), num_train=0, prefix="test_shapes_bad")


def test_default_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SAN_DET_DATASETS", str(tmp_path / "a"))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "b"))
    assert default_shapes_root() == str(tmp_path / "a" / "shapes")
    monkeypatch.delenv("SAN_DET_DATASETS")
    assert default_shapes_root() == str(tmp_path / "b" / "shapes")
    monkeypatch.delenv("DETECTRON2_DATASETS")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_shapes_root() == str(
        tmp_path / "home" / ".cache" / "san_det" / "datasets" / "shapes"
    )
