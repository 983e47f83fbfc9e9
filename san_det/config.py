"""``add_san_det_config(cfg)``: every config key san_det adds to detectron2's defaults."""

from detectron2.config import CfgNode as CN

from .modeling.config import add_backbone_config

__all__ = ["add_san_det_config", "get_san_det_cfg"]


def add_san_det_config(cfg: CN) -> CN:
    """Add san_det's keys, with their defaults, to a detectron2 config (in place; also returned).

    Backbones, FPN and heads: :func:`san_det.modeling.config.add_backbone_config`.
    """
    add_backbone_config(cfg)
    __import__("san_det.engine.config", fromlist=["*"]).add_engine_config(cfg)  # lazy: no cycle
    return cfg


def get_san_det_cfg() -> CN:
    """detectron2's default config extended with san_det's keys."""
    from detectron2.config import get_cfg

    return add_san_det_config(get_cfg())
