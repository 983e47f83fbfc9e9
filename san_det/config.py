"""``add_san_det_config(cfg)``: every config key san_det adds to detectron2's defaults."""

from detectron2.config import CfgNode as CN

from .modeling.config import add_backbone_config

__all__ = ["add_san_det_config", "get_san_det_cfg"]


def add_san_det_config(cfg: CN) -> CN:
    """Add san_det's keys, with their defaults, to a detectron2 config (in place; also returned).

    - backbones, FPN and heads: :func:`san_det.modeling.config.add_backbone_config`;
    - classification (ImageNet pretraining): :func:`san_det.classification.config.add_classification_config`;
    - training robustness (data, checkpoints, launch): :func:`san_det.engine.config.add_engine_config`;
    - datasets named in the config (``DATASETS.COCO_INSTANCES``):
      :func:`san_det.data.config.add_dataset_config`.
    """
    # imported here: san_det.engine and san_det.classification import this module
    from .classification.config import add_classification_config
    from .data.config import add_dataset_config
    from .engine.config import add_engine_config

    add_backbone_config(cfg)
    add_classification_config(cfg)
    add_engine_config(cfg)
    add_dataset_config(cfg)
    return cfg


def get_san_det_cfg() -> CN:
    """detectron2's default config extended with san_det's keys."""
    from detectron2.config import get_cfg

    return add_san_det_config(get_cfg())
