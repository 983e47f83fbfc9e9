"""Checks of the datasets against the model, before anything is written.

:func:`check_dataset_files` checks every COCO json of the run and the size of its images
(:mod:`san_det.data.coco_checks`): a duplicate id, a malformed box, an image whose size differs
from the json is one line before training starts, not a wrong label or a traceback hours later.
:func:`check_detection_classes` loads the config's own COCO datasets (so a broken json is one
clear line in the launching process, not a traceback in every worker) and compares the class
count of every dataset with the detector's ``NUM_CLASSES``; a model with fewer outputs than the
dataset has categories trains silently wrong or crashes, one with more fails only when evaluated.
"""

from typing import Dict, List, Optional, Sequence

from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch import GeneralizedRCNN, RetinaNet

from ..data.coco_checks import check_coco_dataset, check_training_counts, find_coco_problems
from ..data.coco_instances import is_config_coco_dataset, load_config_coco_dataset
from ..engine.validate import without_logging
from ..errors import DatasetError, UserInputError

__all__ = ["check_dataset_files", "check_detection_classes", "detection_num_classes_key"]

README_SECTION = 'README, "Train on your own COCO data"'


def detection_num_classes_key(cfg) -> Optional[str]:
    """The config key holding the detector's class count (None for other meta-architectures)."""
    try:
        arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    except KeyError:
        return None
    if isinstance(arch, type) and issubclass(arch, RetinaNet):
        return "MODEL.RETINANET.NUM_CLASSES"
    if isinstance(arch, type) and issubclass(arch, GeneralizedRCNN):
        return "MODEL.ROI_HEADS.NUM_CLASSES"
    return None


def _coco_files(name: str):
    """``(json_file, image_root)`` of a registered COCO instances dataset, else None."""
    meta = MetadataCatalog.get(name)
    json_file, image_root = meta.get("json_file"), meta.get("image_root")
    if meta.get("evaluator_type") != "coco" or not json_file or image_root is None:
        return None
    return json_file, image_root


def check_dataset_files(
    cfg, names: Sequence[str], training_names: Sequence[str] = (), read_images: bool = True
) -> None:
    """Check the json and the images of every COCO dataset of ``names`` (the datasets the run
    evaluates) and ``training_names`` (registered, files present: after
    :func:`~san_det.engine.setup.validate_datasets`).

    Args:
        training_names: those of ``names`` the run trains on: ``DATALOADER.SKIP_CORRUPT_IMAGES``
            and ``FILTER_EMPTY_ANNOTATIONS`` apply to them, and together they must keep an image.
        read_images: False: the json only (for tools that read no image of the dataset).

    Raises:
        DatasetError: one line naming the dataset, the file and the problem.
    """
    loader = cfg.DATALOADER
    counts = {}
    for name in dict.fromkeys(list(training_names) + list(names)):
        files = _coco_files(name)
        if files is None:
            continue
        if not read_images:
            problems = find_coco_problems(*files, read_images=False).problems
            if problems:
                raise DatasetError(f"dataset {name!r}: {files[0]}: {problems[0].text}")
            continue
        training = name in training_names
        counted = check_coco_dataset(
            name,
            *files,
            training=training,
            evaluated=name in names,
            skip_corrupt_images=loader.get("SKIP_CORRUPT_IMAGES", False),
            filter_empty=loader.FILTER_EMPTY_ANNOTATIONS,
        )
        if training:
            counts[name] = counted
    if counts:
        check_training_counts(counts, loader.FILTER_EMPTY_ANNOTATIONS)


def _short(classes: Sequence[str], limit: int = 8) -> str:
    more = f", ... ({len(classes) - limit} more)" if len(classes) > limit else ""
    return ", ".join(classes[:limit]) + more


def check_detection_classes(cfg, names: Sequence[str]) -> Dict[str, List[str]]:
    """Every dataset has as many categories as the model has classes, and the same ones.

    Call after :func:`~san_det.engine.setup.validate_datasets` (the files exist). Datasets whose
    metadata has no ``thing_classes`` are not checked.

    Returns:
        ``{name: thing_classes}`` of the checked datasets.

    Raises:
        UserInputError: one line naming the key, both numbers and the dataset.
    """
    classes: Dict[str, List[str]] = {}
    for name in dict.fromkeys(names):
        if is_config_coco_dataset(name):
            # Before the run's loggers exist, detectron2's warnings ("Category ids in annotations
            # are not in [1, #categories]! We'll apply a mapping for you.") would reach stderr
            # through Python's last-resort handler; the run logs them when it loads the data.
            with without_logging():
                load_config_coco_dataset(name)  # sets thing_classes exactly as training will
        thing = MetadataCatalog.get(name).get("thing_classes")
        if thing is not None:
            classes[name] = list(thing)
    if len({tuple(thing) for thing in classes.values()}) > 1:
        each = "; ".join(
            f"{name!r} has {len(thing)} ({_short(thing)})" for name, thing in classes.items()
        )
        raise UserInputError(
            f"the datasets of DATASETS.TRAIN / DATASETS.TEST have different categories: {each}; "
            "a class index of the model would mean different things: train and test on datasets "
            f"with the same categories (see the {README_SECTION})"
        )
    key = detection_num_classes_key(cfg)
    if key is None or not classes:
        return classes
    num = cfg.MODEL.RETINANET.NUM_CLASSES if "RETINANET" in key else cfg.MODEL.ROI_HEADS.NUM_CLASSES
    thing = next(iter(classes.values()))
    if len(thing) != num:
        each = " and ".join(f"dataset {name!r} has {len(thing)}" for name in classes)
        raise UserInputError(
            f"{key} is {num} but {each} categories ({_short(thing)}; every category of a COCO "
            f"json counts, with or without annotations): set {key} {len(thing)} (see the "
            f"{README_SECTION})"
        )
    return classes
