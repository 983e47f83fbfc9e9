"""Data loaders of classification training and evaluation, on detectron2's data machinery.

Training: the datasets of ``DATASETS.TRAIN`` (``DatasetCatalog``) as san_det's resumable stream
(:class:`~san_det.engine.loader.DeterministicBatchStream`: shuffled per epoch from ``SEED``,
sharded over processes as detectron2's ``TrainingSampler``, exact on resume), with
``SOLVER.IMS_PER_BATCH`` images per step over all processes and ``DATALOADER.NUM_WORKERS`` workers
per process; detectron2's ``TrainingSampler`` loader when ``SEED`` < 0 is passed unresolved.
Evaluation: detectron2's ``InferenceSampler`` (each image to exactly one process) with
``CLASSIFICATION.TEST.IMS_PER_BATCH`` images per batch over all processes. Batches are
``list[dict]`` as detectron2 models take them.
"""

import logging
from typing import List, Sequence

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
from detectron2.data.build import trivial_batch_collator
from detectron2.data.common import DatasetFromList, MapDataset
from detectron2.data.samplers import InferenceSampler, TrainingSampler
from detectron2.utils import comm

from ..data.classification_transforms import build_classification_transform
from ..data.image_folder import ClassificationDatasetError, CorruptImageError, read_image_rgb
from ..engine.loader import DeterministicBatchStream, ResumableTrainLoader
from ..engine.stop_signals import shielded_worker_init

__all__ = [
    "ClassificationMapper",
    "build_classification_test_loader",
    "build_classification_train_loader",
    "get_classification_dataset_dicts",
]

logger = logging.getLogger(__name__)


class ClassificationMapper:
    """Dataset dict -> ``{"image": (3, H, W) uint8, "label", "image_id", "file_name"}``.

    With ``skip_corrupt`` an unreadable image is logged and skipped (``None``: detectron2's
    ``MapDataset`` then draws another image); otherwise :class:`CorruptImageError` names it.
    """

    def __init__(self, transform, skip_corrupt: bool = False):
        self.transform = transform
        self.skip_corrupt = skip_corrupt

    def __call__(self, dataset_dict: dict):
        try:
            image = read_image_rgb(dataset_dict["file_name"])
        except CorruptImageError as e:
            if self.skip_corrupt:
                logger.warning(f"Skipping an unreadable image: {e}")
                return None
            raise
        out = dict(dataset_dict)
        out["image"] = self.transform(image)
        return out


def get_classification_dataset_dicts(names: Sequence[str], num_classes: int = 0) -> List[dict]:
    """The dicts of the named datasets, concatenated; checks class counts against the model.

    Raises:
        ClassificationDatasetError: an unregistered or empty dataset, or a dataset whose classes
            do not match ``num_classes`` (``CLASSIFICATION.NUM_CLASSES``, when > 0).
    """
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ClassificationDatasetError("no dataset given (DATASETS.TRAIN / DATASETS.TEST)")
    dicts = []
    for name in names:
        if name not in DatasetCatalog.list():
            raise ClassificationDatasetError(
                f"dataset {name!r} is not registered; classification datasets: "
                f"{sorted(n for n in DatasetCatalog.list() if _is_classification(n))}"
            )
        part = DatasetCatalog.get(name)
        if not part:
            raise ClassificationDatasetError(f"dataset {name!r} is empty")
        classes = getattr(MetadataCatalog.get(name), "classes", None)
        if num_classes and classes is not None and len(classes) != num_classes:
            raise ClassificationDatasetError(
                f"dataset {name!r} has {len(classes)} classes but CLASSIFICATION.NUM_CLASSES is "
                f"{num_classes}"
            )
        dicts.extend(part)
    return dicts


def _is_classification(name: str) -> bool:
    return MetadataCatalog.get(name).get("evaluator_type") == "classification"


def build_classification_train_loader(cfg, dataset=None):
    """Infinite training loader over ``DATASETS.TRAIN`` (see the module docstring)."""
    if dataset is None:
        dataset = get_classification_dataset_dicts(
            cfg.DATASETS.TRAIN, cfg.CLASSIFICATION.NUM_CLASSES
        )
    mapper = ClassificationMapper(
        build_classification_transform(cfg, is_train=True),
        cfg.DATALOADER.get("SKIP_CORRUPT_IMAGES", False),
    )
    world, total = comm.get_world_size(), cfg.SOLVER.IMS_PER_BATCH
    if total < 1 or total % world:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({total}) must be a positive multiple of the number of "
            f"processes ({world})"
        )
    if cfg.get("SEED", -1) >= 0:
        stream = DeterministicBatchStream(
            dataset, mapper, total // world, seed=cfg.SEED, aspect_ratio_grouping=False
        )
        return ResumableTrainLoader(stream, cfg.DATALOADER.NUM_WORKERS)
    return build_detection_train_loader(
        dataset=dataset,
        mapper=mapper,
        sampler=TrainingSampler(len(dataset)),
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=False,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )


def build_classification_test_loader(cfg, dataset_name: str):
    """Loader over one test dataset, each image once over all processes, batched."""
    dataset = get_classification_dataset_dicts([dataset_name], cfg.CLASSIFICATION.NUM_CLASSES)
    world = comm.get_world_size()
    total = cfg.CLASSIFICATION.TEST.IMS_PER_BATCH
    if total <= 0 or total % world:
        raise ValueError(
            f"CLASSIFICATION.TEST.IMS_PER_BATCH ({total}) must be > 0 and divisible by the number "
            f"of processes ({world})"
        )
    # Evaluation never skips images: a corrupt validation image is an error.
    mapper = ClassificationMapper(build_classification_transform(cfg, is_train=False))
    data = MapDataset(DatasetFromList(dataset, copy=False), mapper)
    return torch.utils.data.DataLoader(
        data,
        batch_size=total // world,
        sampler=InferenceSampler(len(data)),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=trivial_batch_collator,
        worker_init_fn=shielded_worker_init(),  # stop signals are the trainer's
    )
