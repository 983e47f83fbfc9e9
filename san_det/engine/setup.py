"""Build the config from command-line arguments, checking the user's input before anything runs.

Every check here happens before a file is written, so bad input never leaves partial output
(a ``config.yaml`` or log) that a later run could mistake for a real one.
"""

import os
import tempfile
from typing import Iterable, List

import torch
import yaml
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..config import get_san_det_cfg
from ..data.coco_instances import register_coco_instances_from_cfg
from .errors import UserInputError

__all__ = [
    "setup_cfg",
    "validate_datasets",
    "check_output_dir",
    "prepare_dataset",
    "register_dataset_preparer",
]

_DATASET_PREPARERS = []


def register_dataset_preparer(prepare) -> None:
    """Add ``prepare(name) -> bool``: makes an on-demand dataset, True if ``name`` was its own."""
    _DATASET_PREPARERS.append(prepare)


def _prepare_shapes(name: str) -> bool:
    from ..data import shapes

    if not shapes.is_shapes_dataset(name):
        return False
    try:
        shapes.ensure_shapes_dataset(name)
    except OSError as e:
        raise UserInputError(f"dataset {name!r} could not be generated: {e}") from None
    return True


register_dataset_preparer(_prepare_shapes)


def prepare_dataset(name: str) -> bool:
    """Make ``name`` if it is generated on demand; returns whether it was."""
    return any(prepare(name) for prepare in _DATASET_PREPARERS)


def _merge(cfg: CfgNode, what: str, merge) -> None:
    try:
        merge()
    except KeyError as e:
        # yacs: "Non-existent config key: MODEL.FOO"
        msg = e.args[0] if e.args else str(e)
        raise UserInputError(f"{what}: {msg}") from None
    except (ValueError, AssertionError, TypeError, yaml.YAMLError) as e:
        raise UserInputError(f"{what}: {e}") from None
    except OSError as e:
        raise UserInputError(f"{what}: cannot read {e.filename or e}: {e.strerror or e}") from None


def check_output_dir(path: str, option: str = "OUTPUT_DIR") -> None:
    """Raise :class:`UserInputError` unless ``path`` is (or can become) a writable folder;
    the message names ``option``, where the path came from.

    Leaves nothing behind: folders made for the check are removed again, so a run that fails a
    later check leaves no empty output folder.
    """
    if not path:
        return
    target = os.path.abspath(path)
    created = []
    probe = target
    while not os.path.exists(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    try:
        for folder in reversed(created):
            os.mkdir(folder)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".write_test_"):
            pass
    except OSError as e:
        raise UserInputError(
            f"{option} {path!r} cannot be written ({e.strerror or e}: {e.filename or probe}); "
            f"pass another with {option} /some/dir"
        ) from None
    finally:
        for folder in created:
            if os.path.isdir(folder):
                os.rmdir(folder)


def setup_cfg(
    config_file: str, opts: Iterable[str] = (), freeze: bool = True, check_output: bool = True
) -> CfgNode:
    """detectron2 defaults + san_det keys, merged with ``config_file`` and ``KEY VALUE`` opts.

    ``check_output=False`` skips the OUTPUT_DIR probe: for the worker processes of a launch,
    whose launcher already ran it (workers probing one folder at once would race).

    Raises:
        UserInputError: missing config file, unknown key, bad value, a malformed
            DATASETS.COCO_INSTANCES entry, unwritable OUTPUT_DIR, missing local MODEL.WEIGHTS
            file, a CUDA device without a GPU.
    """
    if not config_file:
        raise UserInputError("--config-file is required (e.g. configs/Demo/shapes_retinanet.yaml)")
    if not os.path.isfile(config_file):
        raise UserInputError(f"config file not found: {config_file}")
    cfg = get_san_det_cfg()
    _merge(cfg, config_file, lambda: cfg.merge_from_file(config_file))
    opts = list(opts)
    if len(opts) % 2:
        raise UserInputError(f"overrides must be KEY VALUE pairs, got an odd number: {opts}")
    _merge(cfg, "command-line overrides", lambda: cfg.merge_from_list(opts))
    register_coco_instances_from_cfg(cfg)  # DATASETS.COCO_INSTANCES, in every process
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise UserInputError(f"MODEL.WEIGHTS file not found: {weights}")
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(
            f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but no CUDA GPU is available; "
            "add `MODEL.DEVICE cpu` to run on the CPU"
        )
    if check_output:
        check_output_dir(cfg.OUTPUT_DIR)
    if freeze:
        cfg.freeze()
    return cfg


def _dataset_files(name: str) -> List[str]:
    meta = MetadataCatalog.get(name)
    return [p for p in (getattr(meta, "json_file", None), getattr(meta, "image_root", None)) if p]


def validate_datasets(names: Iterable[str]) -> None:
    """Check that every dataset is registered and its files exist (or make on-demand ones).

    Raises:
        UserInputError: naming the dataset and the path that is missing.
    """
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            raise UserInputError(
                f"dataset {name!r} is not registered. Registered: {', '.join(sorted(registered))}. "
                "For your own COCO json add [name, json_file, image_root] to "
                'DATASETS.COCO_INSTANCES (README: "Train on your own COCO data")'
            )
        if prepare_dataset(name):
            continue
        missing = [p for p in _dataset_files(name) if not os.path.exists(p)]
        if missing:
            root = os.environ.get("DETECTRON2_DATASETS", "datasets")
            hint = ""
            if name.startswith("coco"):
                hint = (
                    f" COCO is read from $DETECTRON2_DATASETS/coco (DETECTRON2_DATASETS={root!r}): "
                    "coco/annotations/instances_{train,val}2017.json, coco/train2017/, coco/val2017/."
                )
            raise UserInputError(
                f"dataset {name!r} not found: missing {', '.join(map(repr, missing))}.{hint}"
            )
