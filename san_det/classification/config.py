"""``add_classification_config(cfg)``: the config keys of ImageNet-style classification training.

Classification reuses detectron2's keys wherever one exists (``SOLVER.BASE_LR``, ``MOMENTUM``,
``NESTEROV``, ``WEIGHT_DECAY``, ``WEIGHT_DECAY_NORM``, ``LR_SCHEDULER_NAME``, ``WARMUP_*``,
``IMS_PER_BATCH``, ``AMP.ENABLED``, ``DATALOADER.NUM_WORKERS``, ``DATALOADER.SKIP_CORRUPT_IMAGES``
(san_det's engine key), ``SEED``, ``DATASETS.TRAIN/TEST``,
``INPUT.FORMAT``, ``MODEL.PIXEL_MEAN/STD``, ``TEST.EVAL_PERIOD``) and adds the rest under
``cfg.CLASSIFICATION``. A config is a classification config when ``MODEL.META_ARCHITECTURE`` names
:class:`~san_det.classification.classifier.ImageClassifier` (or a subclass of it): see
:func:`is_classification_config`.
"""

from detectron2.config import CfgNode as CN
from detectron2.modeling import META_ARCH_REGISTRY

from .classifier import ImageClassifier

__all__ = ["add_classification_config", "is_classification_config"]


def add_classification_config(cfg: CN) -> CN:
    """Add the ``cfg.CLASSIFICATION`` subtree with its defaults (in place; also returned)."""
    cfg.CLASSIFICATION = CN()
    _C = cfg.CLASSIFICATION
    # Number of classes of the linear classifier; must equal the training set's class count.
    _C.NUM_CLASSES = 1000
    # Backbone output that is globally average-pooled and classified ("res5" = the last stage).
    _C.IN_FEATURE = "res5"
    # Dropout probability before the linear classifier (0 = none).
    _C.DROPOUT = 0.0
    # Label smoothing of the cross-entropy loss (0.1 in the SAN recipe).
    _C.LABEL_SMOOTHING = 0.1

    # Root of ImageNet in folder layout ({train,val}/<class>/<image>); "" = the default,
    # $DETECTRON2_DATASETS/imagenet (./datasets/imagenet when the variable is unset).
    _C.IMAGENET_ROOT = ""

    _C.INPUT = CN()
    # Training: RandomResizedCrop to this size (pixels).
    _C.INPUT.TRAIN_CROP_SIZE = 224
    # RandomResizedCrop: range of the crop's area as a fraction of the image's area.
    _C.INPUT.TRAIN_CROP_SCALE = (0.08, 1.0)
    # RandomResizedCrop: range of the crop's aspect ratio (width / height).
    _C.INPUT.TRAIN_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
    # Training: horizontal flip with probability 0.5.
    _C.INPUT.RANDOM_FLIP = True
    # Evaluation: resize the shorter side to this size, then take the centre crop below.
    _C.INPUT.TEST_RESIZE = 256
    # Evaluation: size of the centre crop (pixels).
    _C.INPUT.TEST_CROP_SIZE = 224
    # Resampling filter of every resize: "bilinear" or "bicubic".
    _C.INPUT.INTERPOLATION = "bilinear"

    _C.SOLVER = CN()
    # SOLVER.BASE_LR is the LR for this many images per step: the LR used is
    # BASE_LR * IMS_PER_BATCH / REFERENCE_BATCH_SIZE (0 = use BASE_LR as is).
    _C.SOLVER.REFERENCE_BATCH_SIZE = 256
    # No weight decay on normalisation layers and position embeddings (SASA's relative
    # embeddings, the attention stem's embeddings). When False, norms use SOLVER.WEIGHT_DECAY_NORM
    # and embeddings SOLVER.WEIGHT_DECAY.
    _C.SOLVER.NO_DECAY_NORM_AND_EMBEDDING = False
    # fnmatch patterns on a parameter's own name (last dotted part) that mark it as an embedding
    # (LocalSelfAttention2d's rel_row/rel_col; the attention stem's emb_row/emb_col/mixture).
    _C.SOLVER.EMBEDDING_PATTERNS = ["rel_*", "emb_*", "*embed*", "mixture"]
    # > 0: train this many epochs of the training set; sets SOLVER.MAX_ITER.
    _C.SOLVER.EPOCHS = 0
    # > 0 (with EPOCHS): warm-up length in epochs; sets SOLVER.WARMUP_ITERS.
    _C.SOLVER.WARMUP_EPOCHS = 0
    # > 0 (with EPOCHS): checkpoint every this many epochs; sets SOLVER.CHECKPOINT_PERIOD.
    _C.SOLVER.CHECKPOINT_PERIOD_EPOCHS = 0
    # > 0 (with EPOCHS): evaluate every this many epochs; sets TEST.EVAL_PERIOD.
    _C.SOLVER.EVAL_PERIOD_EPOCHS = 0

    _C.EMA = CN()
    # Keep an exponential moving average of the weights (SASA: decay 0.9999).
    _C.EMA.ENABLED = False
    # EMA decay per iteration.
    _C.EMA.DECAY = 0.9999
    # Ramp the decay as min(DECAY, (1 + n) / (10 + n)) over the first iterations n.
    _C.EMA.RAMP = True
    # Also evaluate the EMA weights whenever the model is evaluated (results under "ema/").
    _C.EMA.EVAL = True

    _C.TEST = CN()
    # Evaluation batch size over all processes.
    _C.TEST.IMS_PER_BATCH = 64
    # SAN's robustness protocol: also evaluate on the test sets transformed by each of these
    # (any of "rot90", "rot180", "rot270", "vflip", "hflip"; [] = off). The paper's protocol:
    # ["rot90", "rot180", "rot270", "vflip"].
    _C.TEST.ROBUSTNESS_VARIANTS = []
    return cfg


def is_classification_config(cfg: CN) -> bool:
    """Whether ``cfg`` trains an :class:`ImageClassifier` (or a subclass) rather than a detector."""
    name = cfg.MODEL.META_ARCHITECTURE
    try:
        arch = META_ARCH_REGISTRY.get(name)
    except KeyError:
        return False
    return isinstance(arch, type) and issubclass(arch, ImageClassifier)
