"""Config keys of san_det's backbones, attentional FPN and RetinaNet heads.

:func:`add_backbone_config` adds ``cfg.MODEL.SASA`` and ``cfg.MODEL.SAN`` and extends
``cfg.MODEL.FPN`` and ``cfg.MODEL.RETINANET``; ``san_det.config.add_san_det_config`` calls it.
Defaults are the papers' models: SASA-50 with the conv stem and attention in every stage (k = 7,
8 heads) and SAN19 pairwise with the official kernels ``[3, 7, 7, 7, 7]``.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_backbone_config"]


def add_backbone_config(cfg: CN) -> CN:
    """Add the san_det backbone/FPN/head keys to ``cfg`` (in place) and return it."""
    _C = cfg

    # ---------------------------------------------------------------------------------------------
    # SASA ResNets (Ramachandran et al. 2019): ResNet bottlenecks whose 3x3 conv is local attention.
    # Used by MODEL.BACKBONE.NAME build_sasa_backbone / build_sasa_fpn_backbone /
    # build_retinanet_sasa_fpn_backbone.
    # ---------------------------------------------------------------------------------------------
    _C.MODEL.SASA = CN()
    # Blocks per stage: 26 -> [1, 2, 4, 1], 38 -> [2, 3, 5, 2], 50 -> [3, 4, 6, 3].
    _C.MODEL.SASA.DEPTH = 50
    # "conv": 7x7/2 conv + 3x3/2 max pool; "attention": SASA's spatially-aware attention stem.
    _C.MODEL.SASA.STEM = "conv"
    # Output channels of the stem (either kind).
    _C.MODEL.SASA.STEM_OUT_CHANNELS = 64
    # Attention stem: side of the attention blocks and of the max pool (the stem's stride).
    _C.MODEL.SASA.STEM_BLOCK_SIZE = 4
    # Attention stem: number of heads (must divide STEM_OUT_CHANNELS with an even head width).
    _C.MODEL.SASA.STEM_NUM_HEADS = 8
    # Attention stem: number M of value matrices mixed by position (spatially-aware values).
    _C.MODEL.SASA.STEM_NUM_VALUE_MIXTURES = 4
    # Block type of res2..res5, each "attention" or "conv" (the paper's Table 3 ablation).
    _C.MODEL.SASA.STAGE_TYPES = ["attention", "attention", "attention", "attention"]
    # Spatial extent k of the attention window (odd).
    _C.MODEL.SASA.KERNEL_SIZE = 7
    # Attention heads per layer (must divide every stage's bottleneck width, even head width).
    _C.MODEL.SASA.NUM_HEADS = 8
    # Normalisation of stem and blocks: "BN", "SyncBN", "FrozenBN", "GN" (FrozenBN only with
    # pretrained weights: from scratch it diverges).
    _C.MODEL.SASA.NORM = "BN"
    # Bottleneck width of res2 (doubles per stage), as detectron2's RESNETS.WIDTH_PER_GROUP.
    _C.MODEL.SASA.WIDTH_PER_GROUP = 64
    # Output channels of res2 (doubles per stage).
    _C.MODEL.SASA.RES2_OUT_CHANNELS = 256
    # Conv stages only: put the stride in the first 1x1 conv (MSRA) instead of the 3x3 conv.
    _C.MODEL.SASA.STRIDE_IN_1X1 = False
    # Initialise the last norm of every residual branch to zero (blocks start as identities).
    _C.MODEL.SASA.ZERO_INIT_RESIDUAL = False
    # Features returned by the backbone: any of "stem", "res2".."res5".
    _C.MODEL.SASA.OUT_FEATURES = ["res3", "res4", "res5"]

    # ---------------------------------------------------------------------------------------------
    # SAN (Zhao, Jia, Koltun 2020), the official architecture: conv_in, then five stages of
    # max pool -> 1x1 conv -> pre-activation SAM blocks -> BN -> ReLU at strides 2..32; the
    # stages at strides 4..32 are exposed as res2..res5. Used by MODEL.BACKBONE.NAME
    # build_san_backbone / build_san_fpn_backbone / build_retinanet_san_fpn_backbone.
    # ---------------------------------------------------------------------------------------------
    _C.MODEL.SAN = CN()
    # Blocks per stage: 10 -> [2, 1, 2, 4, 1], 15 -> [3, 2, 3, 5, 2], 19 -> [3, 3, 4, 6, 3].
    _C.MODEL.SAN.DEPTH = 19
    # "pairwise" or "patchwise" self-attention.
    _C.MODEL.SAN.SA_TYPE = "pairwise"
    # Relation delta; "" = the official one ("subtraction" pairwise, "concatenation" patchwise).
    # Pairwise: subtraction, summation, concatenation, hadamard, dot; patchwise: concatenation,
    # star, clique.
    _C.MODEL.SAN.RELATION = ""
    # Footprint k of the five stages (strides 2, 4, 8, 16, 32).
    _C.MODEL.SAN.KERNELS = [3, 7, 7, 7, 7]
    # Neighbours outside the image: "reflect" (official; needs every stage larger than k // 2,
    # i.e. inputs of at least 128x128 with k = 7) or "zeros".
    _C.MODEL.SAN.PAD_MODE = "reflect"
    # Output channels c share one attention weight channel per group of SHARE_PLANES.
    _C.MODEL.SAN.SHARE_PLANES = 8
    # Width of the first stage (official 64); later stages have 4x, 8x, 16x, 32x this width.
    _C.MODEL.SAN.BASE_WIDTH = 64
    # Normalisation of every BatchNorm of the network, SAM's included: "BN", "SyncBN",
    # "FrozenBN", "GN".
    _C.MODEL.SAN.NORM = "BN"
    # Features returned by the backbone: any of "res2".."res5".
    _C.MODEL.SAN.OUT_FEATURES = ["res3", "res4", "res5"]

    # ---------------------------------------------------------------------------------------------
    # Attentional FPN (SASA appendix A.3); honoured by san_det's FPN builders.
    # ---------------------------------------------------------------------------------------------
    # Replace the FPN's 3x3 output convs and the P6/P7 convs by local self-attention (the strided
    # ones followed by a 2x2 average pool).
    _C.MODEL.FPN.ATTENTION = False
    # Spatial extent of the FPN attention layers.
    _C.MODEL.FPN.ATTENTION_KERNEL_SIZE = 7
    # Heads of the FPN attention layers (must divide MODEL.FPN.OUT_CHANNELS).
    _C.MODEL.FPN.ATTENTION_NUM_HEADS = 8
    # Input of RetinaNet's P6 (san_det's RetinaNet FPN builders): "res5" (detectron2's C5) or
    # "p5" (the 256-channel P5, a much smaller P6 layer).
    _C.MODEL.FPN.TOP_BLOCK_IN_FEATURE = "res5"

    # ---------------------------------------------------------------------------------------------
    # RetinaNet head choice; honoured by META_ARCHITECTURE "SanDetRetinaNet".
    # ---------------------------------------------------------------------------------------------
    # "RetinaNetHead" (detectron2's conv head) or "AttentionRetinaNetHead" (SASA's).
    _C.MODEL.RETINANET.HEAD_NAME = "RetinaNetHead"
    # Spatial extent of the attention head's layers.
    _C.MODEL.RETINANET.ATTENTION_KERNEL_SIZE = 7
    # Heads of the attention head's layers (must divide the FPN width).
    _C.MODEL.RETINANET.ATTENTION_NUM_HEADS = 8
    # Std of the normal initialisation of the head's value projections (paper: 0.01).
    _C.MODEL.RETINANET.ATTENTION_VALUE_INIT_STD = 0.01
    return cfg
