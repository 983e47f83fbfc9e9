"""Tiny classification configs: a 16-channel ResNet-18 at 16x16, a narrow SASA-26 and SAN10."""

import san_det.classification  # noqa: F401  (registers ImageClassifier and the datasets)
from san_det.config import get_san_det_cfg

from .paths import config_path

DEMO_CONFIG = config_path("ImageNet", "embedded_cpu_demo.yaml")
IMAGE_SIZE = 16  # of the ``digits`` fixture (tests/classification/conftest.py)


def tiny_resnet_cfg(output_dir: str, train: str, val: str):
    """The CPU demo config (ResNet-18) with a 16-channel stem, 16x16 inputs, 60 iterations."""
    cfg = get_san_det_cfg(DEMO_CONFIG)
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train,), (val,)
    c = cfg.CLASSIFICATION
    c.INPUT.TRAIN_CROP_SIZE = c.INPUT.TEST_RESIZE = c.INPUT.TEST_CROP_SIZE = IMAGE_SIZE
    c.SOLVER.EPOCHS = c.SOLVER.WARMUP_EPOCHS = 0
    c.SOLVER.EVAL_PERIOD_EPOCHS = c.SOLVER.CHECKPOINT_PERIOD_EPOCHS = 0
    cfg.SOLVER.MAX_ITER = 60
    cfg.SOLVER.WARMUP_ITERS = 10
    cfg.SOLVER.IMS_PER_BATCH = 32
    cfg.SOLVER.BASE_LR = 0.2  # per 256 images: 0.025 at batch 32
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.TEST.EVAL_PERIOD = 0
    cfg.SEED = 0  # initialisation and data stream: the test sees the same run every time
    cfg.OUTPUT_DIR = output_dir
    return cfg


def tiny_sasa_cfg(**overrides):
    """A tiny SASA-26 classifier (widths 16..128, k = 3, 2 heads) for 32x32 inputs."""
    cfg = get_san_det_cfg(config_path("ImageNet", "sasa26.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    s = cfg.MODEL.SASA
    s.STEM_OUT_CHANNELS, s.WIDTH_PER_GROUP, s.RES2_OUT_CHANNELS = 16, 4, 16
    s.KERNEL_SIZE, s.NUM_HEADS, s.STEM_NUM_HEADS = 3, 2, 2
    cfg.CLASSIFICATION.NUM_CLASSES = 10
    cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return cfg


def tiny_san_cfg(sa_type: str = "pairwise", **overrides):
    """A tiny SAN10 classifier (base width 16, footprints 3) with zero padding for 32x32 inputs."""
    cfg = get_san_det_cfg(config_path("ImageNet", f"san10_{sa_type}.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SAN.BASE_WIDTH = 16
    cfg.MODEL.SAN.SHARE_PLANES = 2
    cfg.MODEL.SAN.KERNELS = [3, 3, 3, 3, 3]
    cfg.MODEL.SAN.PAD_MODE = "zeros"
    cfg.CLASSIFICATION.NUM_CLASSES = 10
    cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return cfg
