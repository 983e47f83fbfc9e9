"""san_det's config: :func:`add_san_det_config` (every key san_det adds to detectron2's defaults),
:func:`get_san_det_cfg` and :func:`setup_cfg` (the command-line tools' config, checked).

It sits above every layer whose keys it collects (modeling, data, engine, classification), so
no module of those layers imports it.
"""

from typing import Iterable

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .classification.config import add_classification_config
from .data.config import add_dataset_config
from .engine.config import add_engine_config
from .engine.setup import merge_cfg
from .modeling.config import add_backbone_config

__all__ = ["add_san_det_config", "get_san_det_cfg", "setup_cfg"]


def add_san_det_config(cfg: CN) -> CN:
    """Add san_det's keys, with their defaults, to a detectron2 config (in place; also returned).

    - backbones, FPN and heads: :func:`san_det.modeling.config.add_backbone_config`;
    - classification (ImageNet pretraining): :func:`san_det.classification.config.add_classification_config`;
    - training robustness (data, checkpoints, launch): :func:`san_det.engine.config.add_engine_config`;
    - datasets named in the config (``DATASETS.COCO_INSTANCES``):
      :func:`san_det.data.config.add_dataset_config`.
    """
    add_backbone_config(cfg)
    add_classification_config(cfg)
    add_engine_config(cfg)
    add_dataset_config(cfg)
    return cfg


def get_san_det_cfg(config_file: str = "", opts: Iterable[str] = ()) -> CN:
    """detectron2's default config extended with san_det's keys, merged with ``config_file``
    (if given) and ``KEY VALUE`` ``opts``, unchecked (:func:`setup_cfg` checks)."""
    cfg = add_san_det_config(get_cfg())
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def setup_cfg(
    config_file: str, opts: Iterable[str] = (), freeze: bool = True, check_output: bool = True
) -> CN:
    """san_det's config merged with ``config_file`` and ``KEY VALUE`` opts, every value checked
    before anything is written (:func:`san_det.engine.setup.merge_cfg`, which lists the errors).

    ``check_output=False`` skips the OUTPUT_DIR probe: for the worker processes of a launch,
    whose launcher already ran it (workers probing one folder at once would race).

    Raises:
        UserInputError: naming the file, key or value.
    """
    return merge_cfg(get_san_det_cfg(), config_file, opts, freeze=freeze, check_output=check_output)
