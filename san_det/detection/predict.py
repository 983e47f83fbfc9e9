"""Predictions on image files (what ``tools/predict.py`` runs), checked before anything is written.

:func:`predict_images` runs a trained detector on a list of files, as evaluation runs it
(:class:`~san_det.detection.visualize.FilePredictor`), and writes into the output folder:

- one drawing per input, ``<name>.png`` (``<name>`` is the input's path relative to the inputs'
  common folder, without its extension, so inputs from several folders keep apart);
- ``coco_instances_results.json``: every detection with score >= the threshold, in the COCO
  results format (``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` in pixels of the
  original image, ``score``), as ``COCOEvaluator`` writes it: ``category_id`` is the dataset's
  own id when the config's dataset maps ids (COCO jsons), else the class index;
- ``images.json``: ``{"images": [{"id", "file_name", "height", "width", "drawing"}],
  "categories": [{"id", "name"}]}``: image ids are 1, 2, ... in the sorted order of the inputs,
  ``file_name`` the path as found.

Everything is written into a hidden staging folder inside the output folder and moved into place
at the end (:mod:`.predict_output`: the folder is locked while a run writes it, and a rerun
replaces the previous prediction whole): an image that turns out unreadable halfway, a signal or
a full disk leaves the folder as it was.
"""

import glob
import json
import logging
import os
import shutil
import time
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.modeling import build_model
from PIL import Image

from ..data.coco_instances import is_config_coco_dataset
from ..data.mapper import IMAGE_EXTENSIONS, read_image_robust
from ..engine.checkpoint import checkpointer_options
from ..engine.checkpoint_rules import choose_checkpoint
from ..engine.setup import check_output_dir
from ..errors import UserInputError
from ..utils.atomic import temporary_name
from .dataset_checks import check_dataset_files, check_detection_classes
from .predict_output import commit_prediction
from .trainer import DetectorCheckpointer
from .visualize import FilePredictor, draw_predictions

__all__ = [
    "IMAGES_FILE",
    "RESULTS_FILE",
    "check_images_open",
    "check_prediction_output",
    "class_metadata",
    "collect_images",
    "drawing_names",
    "load_detector",
    "predict_images",
]

logger = logging.getLogger(__name__)

RESULTS_FILE = "coco_instances_results.json"
IMAGES_FILE = "images.json"


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path)


def _skipped_warning(skipped: Sequence[str]) -> str:
    kinds = Counter(os.path.splitext(p)[1].lower() or "(no extension)" for p in skipped)
    counts = ", ".join(f"{n} {ext}" for ext, n in sorted(kinds.items()))
    return (
        f"Skipped {len(skipped)} file(s) of the input folders / globs that are not images "
        f"({counts}; read: {', '.join(IMAGE_EXTENSIONS)}), e.g. {skipped[0]}"
    )


def collect_images(inputs: Sequence[str]) -> List[str]:
    """Image files named by ``inputs`` (files, folders: their images, not recursive; globs),
    sorted, without duplicates. Other files of the folders and globs (GIFs, text files) are
    skipped, counted in one warning.

    Raises:
        UserInputError: an input that is neither, or no image at all.
    """
    images, skipped = [], []
    for item in inputs:
        if os.path.isdir(item):
            paths = [os.path.join(item, n) for n in sorted(os.listdir(item))]
        elif os.path.isfile(item):
            images.append(item)  # named explicitly: whatever its extension
            continue
        elif glob.has_magic(item):
            paths = sorted(glob.glob(item, recursive=True))
        else:
            raise UserInputError(f"--input {item}: no such file or folder")
        images += [p for p in paths if _is_image(p)]
        skipped += [p for p in paths if os.path.isfile(p) and not _is_image(p)]
    images = sorted(dict.fromkeys(os.path.normpath(p) for p in images))
    if skipped:
        logger.warning(_skipped_warning(skipped))
    if not images:
        raise UserInputError(
            f"--input {' '.join(inputs)}: no image files ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return images


def check_images_open(files: Sequence[str]) -> None:
    """Every file opens as an image (header only; a truncated file is caught when decoded)."""
    for path in files:
        try:
            with Image.open(path) as image:
                image.size
        except (OSError, SyntaxError, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserInputError(f"cannot read image {path}: {reason}") from None


def drawing_names(files: Sequence[str]) -> List[str]:
    """``<path relative to the files' common folder, extension replaced by .png>`` per file.

    Raises:
        UserInputError: two inputs would get the same name (``a.jpg`` and ``a.png``).
    """
    absolute = [os.path.abspath(f) for f in files]
    common = os.path.commonpath([os.path.dirname(p) for p in absolute])
    names = [os.path.splitext(os.path.relpath(p, common))[0] + ".png" for p in absolute]
    seen: Dict[str, str] = {}
    for name, path in zip(names, files):
        if name in seen:
            raise UserInputError(f"inputs {seen[name]} and {path} would both be drawn as {name}")
        seen[name] = path
    return names


def class_metadata(cfg):
    """The metadata naming the model's classes: that of the first dataset of ``DATASETS.TEST``,
    then ``DATASETS.TRAIN``, whose classes are known (a COCO json from the config is read for
    them); its class count is checked against the model's. Without one, a warning and
    unnamed classes (drawn as numbers).

    Raises:
        UserInputError: the dataset's class count differs from the model's ``NUM_CLASSES``.
    """
    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        if name not in DatasetCatalog.list():
            continue
        meta = MetadataCatalog.get(name)
        if is_config_coco_dataset(name) and not os.path.isfile(meta.json_file):
            continue
        check_dataset_files(cfg, [name], read_images=False)  # a malformed json: one line
        if check_detection_classes(cfg, [name]).get(name):
            return meta
    logger.warning(
        "No dataset of DATASETS.TEST / DATASETS.TRAIN names the classes (or its json is "
        "missing): detections are labelled by class index"
    )
    return MetadataCatalog.get("__san_det_predict_unnamed__")


def load_detector(cfg) -> torch.nn.Module:
    """The detector of ``cfg`` with every tensor loaded from ``cfg.MODEL.WEIGHTS``, in eval mode.

    Raises:
        UserInputError: ``MODEL.WEIGHTS`` is empty, or does not fit the model (names the key).
    """
    choice = choose_checkpoint(cfg.MODEL.WEIGHTS, "", resume=False, purpose="predict")
    model = build_model(cfg)
    DetectorCheckpointer(model, **checkpointer_options(cfg)).load_chosen(choice)
    return model.eval()


def _coco_results(instances, image_id: int, metadata) -> List[Dict]:
    results = instances_to_coco_json(instances, image_id)
    id_map = metadata.get("thing_dataset_id_to_contiguous_id")
    if id_map:
        reverse = {v: k for k, v in id_map.items()}
        for r in results:
            r["category_id"] = reverse[r["category_id"]]
    return results


def _categories(metadata, num_classes: int) -> List[Dict]:
    names = metadata.get("thing_classes") or [str(i) for i in range(num_classes)]
    id_map = metadata.get("thing_dataset_id_to_contiguous_id")
    reverse = {v: k for k, v in id_map.items()} if id_map else {i: i for i in range(len(names))}
    return [{"id": reverse[i], "name": n} for i, n in enumerate(names)]


def _progress(done: int, total: int, start: float) -> str:
    elapsed = time.perf_counter() - start
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else 0.0
    return f"{done}/{total} images, {rate:.2f} images/s, {elapsed:.0f} s, ETA {eta:.0f} s"


def check_prediction_output(
    files: Sequence[str], output_dir: str, confidence_threshold: float, max_size: int
) -> List[str]:
    """The checks :func:`predict_images` makes before writing; returns the drawing names.

    Raises:
        UserInputError: a threshold outside [0, 1], a size < 1, an output folder that is a file
            or cannot be written, two inputs that would share a drawing name.
    """
    if not 0.0 <= confidence_threshold <= 1.0:
        raise UserInputError(
            f"--confidence-threshold must be in [0, 1], got {confidence_threshold}"
        )
    if max_size < 1:
        raise UserInputError(f"the drawing size must be >= 1 pixel, got {max_size}")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserInputError(f"--output {output_dir} is a file, not a folder")
    names = drawing_names(files)
    check_output_dir(output_dir, option="--output")
    return names


def predict_images(
    cfg,
    model: torch.nn.Module,
    files: Sequence[str],
    output_dir: str,
    confidence_threshold: float,
    max_size: int,
    metadata,
    report: Optional[Callable[[str], None]] = None,
    report_every_s: float = 10.0,
) -> Dict:
    """Predict on ``files``, write drawings and the JSON files into ``output_dir`` (see the
    module docstring), which :func:`~.predict_output.open_prediction_folder` has locked.
    ``report`` gets a progress line every ``report_every_s`` seconds.

    Returns:
        ``{"images": n, "detections": m, "output_dir": path}``.

    Raises:
        UserInputError: the output folder cannot be written, two inputs share a drawing name,
            an image cannot be decoded (nothing is written then).
    """
    names = check_prediction_output(files, output_dir, confidence_threshold, max_size)
    predictor = FilePredictor(cfg, model)
    results, images = [], []
    start = last_report = time.perf_counter()
    staging = temporary_name(os.path.join(output_dir, "prediction"), unique=True)
    os.makedirs(staging)
    try:
        for image_id, (path, name) in enumerate(zip(files, names), start=1):
            instances = predictor(path)
            instances = instances[instances.scores >= confidence_threshold]
            rgb = read_image_robust(path, format="RGB")
            drawing = os.path.join(staging, name)
            os.makedirs(os.path.dirname(drawing), exist_ok=True)
            Image.fromarray(draw_predictions(rgb, instances, metadata, max_size)).save(drawing)
            results += _coco_results(instances, image_id, metadata)
            height, width = rgb.shape[:2]
            images.append(
                {"id": image_id, "file_name": path, "height": height, "width": width,
                 "drawing": name}  # fmt: skip
            )
            now = time.perf_counter()
            if report is not None and now - last_report >= report_every_s:
                report(_progress(image_id, len(files), start))
                last_report = now
        with open(os.path.join(staging, RESULTS_FILE), "w") as f:
            json.dump(results, f)
        num_classes = len(metadata.get("thing_classes") or []) or cfg.MODEL.RETINANET.NUM_CLASSES
        with open(os.path.join(staging, IMAGES_FILE), "w") as f:
            json.dump({"images": images, "categories": _categories(metadata, num_classes)}, f)
        commit_prediction(staging, output_dir)
    finally:  # after a failure or a signal too
        shutil.rmtree(staging, ignore_errors=True)
    if report is not None:
        report(_progress(len(files), len(files), start))
    return {"images": len(files), "detections": len(results), "output_dir": output_dir}
