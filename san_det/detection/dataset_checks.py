"""Checks of the datasets against the model, before anything is written.

:func:`check_detection_classes` loads the config's own COCO datasets (so a broken json is one
clear line in the launching process, not a traceback in every worker) and compares the class
count of every dataset with the detector's ``NUM_CLASSES``; a model with fewer outputs than the
dataset has categories trains silently wrong or crashes, one with more fails only when evaluated.
"""

from typing import Dict, List, Optional, Sequence

from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch import GeneralizedRCNN, RetinaNet

from ..data.coco_instances import is_config_coco_dataset, load_config_coco_dataset
from ..errors import UserInputError

__all__ = ["check_detection_classes", "detection_num_classes_key"]

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
            load_config_coco_dataset(name)  # sets thing_classes exactly as training will
        thing = MetadataCatalog.get(name).get("thing_classes")
        if thing is not None:
            classes[name] = list(thing)
    key = detection_num_classes_key(cfg)
    if key is None:
        return classes
    num = cfg.MODEL.RETINANET.NUM_CLASSES if "RETINANET" in key else cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for name, thing in classes.items():
        if len(thing) != num:
            raise UserInputError(
                f"{key} is {num} but dataset {name!r} has {len(thing)} categories "
                f"({_short(thing)}; every category of a COCO json counts, with or without "
                f"annotations): set {key} {len(thing)} (see the {README_SECTION})"
            )
    first = next(iter(classes.items()), None)
    for name, thing in classes.items():
        if thing != first[1]:
            raise UserInputError(
                f"datasets {first[0]!r} and {name!r} have different categories ({_short(first[1])} "
                f"vs {_short(thing)}): a class index of the model would mean different things"
            )
    return classes
