"""Forwards of san_det's networks restated in plain torch, for numeric tests of the modules.

Each function recomputes a module's output from its own submodules and parameters, following
the papers and detectron2's documented semantics written out here (not by calling the module's
``forward``), so that a change in how a module composes its parts (a dropped residual add, a
missing ReLU, a wrong feature fed to a level) shows up as a numeric difference. The attention
layers themselves (``LocalSelfAttention2d``, ``SAM``, the attention stem) are called as black
boxes: ``tests/layers`` checks them against their reference ops.

Use float64 models in eval mode with :func:`randomize_norms` (so that no norm is an identity).
"""

import math
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicStem
from torch import Tensor, nn

from san_det.modeling import (
    AttentionConv2d,
    AttentionRetinaNetHead,
    AttentionStem,
    LastLevelP6P7Attention,
    SANBackbone,
)

__all__ = [
    "assert_close_f64",
    "randomize_norms",
    "restated_conv_layer",
    "restated_bottleneck",
    "restated_resnet",
    "restated_san_block",
    "restated_san",
    "restated_top_block",
    "restated_fpn",
    "restated_attention_head",
    "restated_conv_head",
    "assert_retinanet_runs_the_restated_network",
]

_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d, nn.GroupNorm, CycleBatchNormList)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm random statistics and affine parameters (an identity hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if not isinstance(module, _NORMS):
            continue
        for name in ("running_mean", "bias"):
            t = getattr(module, name, None)
            if isinstance(t, Tensor):
                t.data.copy_(0.2 * torch.randn(t.shape, generator=g, dtype=torch.float64))
        for name in ("running_var", "weight"):
            t = getattr(module, name, None)
            if isinstance(t, Tensor):
                t.data.copy_(0.5 + torch.rand(t.shape, generator=g, dtype=torch.float64))
    return model


def assert_close_f64(actual: Tensor, expected: Tensor, what: str = "") -> None:
    """Float64 agreement relative to the tensor's scale: only the summation order differs between
    the two computations, which leaves errors near 1e-13 of the largest value here (eps 2e-16
    times sums of a few hundred terms) on any CPU; 1e-9 is far above that and far below a bug."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = float(expected.abs().max())
    error = float((actual - expected).abs().max())
    assert scale > 0 and error <= 1e-9 * scale, f"{what}: max error {error:.3g}, scale {scale:.3g}"


def _plain_norm(norm: nn.Module, x: Tensor, level: int = 0) -> Tensor:
    """An eval-mode norm written out; ``CycleBatchNormList`` uses level ``level``'s statistics
    and its shared affine."""
    if isinstance(norm, CycleBatchNormList):
        bn = norm[level]
        scale = norm.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = norm.bias - bn.running_mean * scale
        return x * scale[:, None, None] + shift[:, None, None]
    if isinstance(norm, (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)):  # eval: same
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        return (x - norm.running_mean[:, None, None]) * scale[:, None, None] + norm.bias[
            :, None, None
        ]
    if isinstance(norm, nn.GroupNorm):
        n, c, h, w = x.shape
        g = x.reshape(n, norm.num_groups, -1)
        mean, var = g.mean(-1, keepdim=True), g.var(-1, unbiased=False, keepdim=True)
        y = ((g - mean) / torch.sqrt(var + norm.eps)).reshape(n, c, h, w)
        return y * norm.weight[:, None, None] + norm.bias[:, None, None]
    raise TypeError(f"no plain form for {type(norm).__name__}")


def restated_conv_layer(layer: nn.Module, x: Tensor, level: int = 0) -> Tensor:
    """detectron2's ``Conv2d`` or san_det's ``AttentionConv2d``: op, then norm (for
    ``AttentionConv2d`` the op is its attention layer, tested in ``tests/layers``). No activation:
    the callers apply the ReLUs the architectures have."""
    if isinstance(layer, AttentionConv2d):
        y = layer.attention(x)
    else:
        y = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                     layer.groups)  # fmt: skip
    if getattr(layer, "norm", None) is not None:
        y = _plain_norm(layer.norm, y, level)
    return y


def restated_bottleneck(block: nn.Module, x: Tensor) -> Tensor:
    """ResNet's bottleneck: ``relu(conv3(relu(conv2(relu(conv1(x))))) + shortcut(x))``."""
    out = F.relu(restated_conv_layer(block.conv1, x))
    out = F.relu(restated_conv_layer(block.conv2, out))
    out = restated_conv_layer(block.conv3, out)
    shortcut = x if block.shortcut is None else restated_conv_layer(block.shortcut, x)
    return F.relu(out + shortcut)


def _stem(stem: nn.Module, x: Tensor) -> Tensor:
    if isinstance(stem, BasicStem):  # 7x7/2 conv + norm, ReLU, 3x3/2 max pool
        return F.max_pool2d(F.relu(restated_conv_layer(stem.conv1, x)), 3, 2, 1)
    if isinstance(stem, AttentionStem):
        return stem.attention(x)
    raise TypeError(f"no restated stem for {type(stem).__name__}")


def restated_resnet(model: nn.Module, x: Tensor) -> Dict[str, Tensor]:
    """A detectron2 ``ResNet`` (SASA's included): stem, then ``res2``..``res5`` block by block."""
    outputs = {}
    x = _stem(model.stem, x)
    if "stem" in model._out_features:
        outputs["stem"] = x
    for i in range(2, 6):
        stage = getattr(model, f"res{i}", None)
        if stage is None:
            break
        for block in stage:
            x = restated_bottleneck(block, x)
        if f"res{i}" in model._out_features:
            outputs[f"res{i}"] = x
    return outputs


def restated_san_block(block: nn.Module, x: Tensor) -> Tensor:
    """SAN's pre-activation block (hszhao/SAN ``Bottleneck``):
    ``x + conv(relu(bn2(sam(relu(bn1(x))))))``."""
    out = F.relu(_plain_norm(block.bn1, x))
    out = F.relu(_plain_norm(block.bn2, block.sam(out)))
    return F.conv2d(out, block.conv.weight, block.conv.bias) + x


def restated_san(model: nn.Module, x: Tensor) -> Dict[str, Tensor]:
    """SAN (hszhao/SAN ``SAN.forward``): ``relu(bn_in(conv_in(x)))``, then per stage ``i``
    ``relu(bn_i(layer_i(conv_i(maxpool_2x2(x)))))``; stage ``i >= 1`` is ``res{i+1}``."""
    outputs = {}
    x = F.relu(_plain_norm(model.bn_in, F.conv2d(x, model.conv_in.weight)))
    for i in range(model.num_stages):
        x = F.conv2d(F.max_pool2d(x, 2, 2), getattr(model, f"conv{i}").weight)
        for block in getattr(model, f"layer{i}"):
            x = restated_san_block(block, x)
        x = F.relu(_plain_norm(getattr(model, f"bn{i}"), x))
        if f"res{i + 1}" in model._out_features:
            outputs[f"res{i + 1}"] = x
    return outputs


def restated_top_block(block: nn.Module, x: Tensor) -> List[Tensor]:
    """FPN's extra levels: P6 = 1x1 max pool at stride 2 of P5 (R-CNN); RetinaNet's
    ``p6 = conv3x3_s2(x)``, ``p7 = conv3x3_s2(relu(p6))`` (conv or attention at stride 2)."""
    if isinstance(block, LastLevelMaxPool):
        return [F.max_pool2d(x, kernel_size=1, stride=2, padding=0)]
    if isinstance(block, LastLevelP6P7):
        p6 = F.conv2d(x, block.p6.weight, block.p6.bias, stride=2, padding=1)
        p7 = F.conv2d(F.relu(p6), block.p7.weight, block.p7.bias, stride=2, padding=1)
        return [p6, p7]
    if isinstance(block, LastLevelP6P7Attention):
        p6 = restated_conv_layer(block.p6, x)
        return [p6, restated_conv_layer(block.p7, F.relu(p6))]
    raise TypeError(f"no restated top block for {type(block).__name__}")


def restated_fpn(fpn: nn.Module, x: Tensor, bottom_up=None) -> Dict[str, Tensor]:
    """FPN (Lin et al. 2017): lateral 1x1 of each input, top-down ``lateral + upsample2x(prev)``
    (halved for "avg"), 3x3 (or attention) output per level, ``p{log2 stride}``; the top block
    reads a bottom-up feature or a P level. ``bottom_up`` restates the bottom-up network
    (default: the module's own forward)."""
    features = (bottom_up or fpn.bottom_up)(x)
    shapes = fpn.bottom_up.output_shape()
    stages = [int(math.log2(shapes[name].stride)) for name in fpn.in_features]
    results, prev = {}, None
    for name, stage in reversed(list(zip(fpn.in_features, stages))):
        lateral = restated_conv_layer(getattr(fpn, f"fpn_lateral{stage}"), features[name])
        if prev is not None:
            lateral = lateral + F.interpolate(prev, scale_factor=2.0, mode="nearest")
            if fpn._fuse_type == "avg":
                lateral = lateral / 2
        prev = lateral
        results[f"p{stage}"] = restated_conv_layer(getattr(fpn, f"fpn_output{stage}"), prev)
    if fpn.top_block is not None:
        source = fpn.top_block.in_feature
        extra = restated_top_block(
            fpn.top_block, features[source] if source in features else results[source]
        )
        for k, level in enumerate(extra, start=max(stages) + 1):
            results[f"p{k}"] = level
    return {name: results[name] for name in sorted(results, key=lambda n: int(n[1:]))}


def _two_subnets(head: nn.Module, features: List[Tensor], run_subnet, padding: int):
    """RetinaNet's head shape: per level, ``run_subnet(subnet, x, level)`` for the class and the
    box subnet, each followed by its prediction conv (``padding`` 1 for 3x3, 0 for 1x1)."""
    logits, boxes = [], []
    for level, x in enumerate(features):
        for subnet, pred, out in ((head.cls_subnet, head.cls_score, logits),
                                  (head.bbox_subnet, head.bbox_pred, boxes)):  # fmt: skip
            y = run_subnet(subnet, x, level)
            out.append(F.conv2d(y, pred.weight, pred.bias, padding=padding))
    return logits, boxes


def restated_attention_head(head: nn.Module, features: List[Tensor]) -> Tuple[List, List]:
    """SASA's RetinaNet head: per level, each subnet's ``relu(norm(attention(x)))`` layers (the
    norm of level ``l`` for per-level BN), then the 1x1 class and box predictions."""

    def run(subnet, y, level):
        for layer in subnet:
            y = F.relu(restated_conv_layer(layer, y, level))
        return y

    return _two_subnets(head, features, run, padding=0)


def restated_conv_head(head: nn.Module, features: List[Tensor]) -> Tuple[List, List]:
    """detectron2's RetinaNet head: per level, each subnet's ``relu(norm(conv3x3(x)))`` layers,
    then the 3x3 class and box predictions."""

    def run(subnet, y, level):
        for layer in subnet:
            if isinstance(layer, nn.Conv2d):
                y = F.conv2d(y, layer.weight, layer.bias, padding=1)
            elif isinstance(layer, nn.ReLU):
                y = F.relu(y)
            else:
                y = _plain_norm(layer, y, level)
        return y

    return _two_subnets(head, features, run, padding=1)


class _HeadRan(Exception):
    pass


def assert_retinanet_runs_the_restated_network(model: nn.Module, images: Tensor) -> None:
    """A float64 RetinaNet in eval mode on ``images`` (``(N, 3, H, W)`` uint8, sides multiples
    of 32): normalised images -> restated bottom-up -> restated FPN -> the head's inputs, in
    ``MODEL.RETINANET.IN_FEATURES`` order -> the restated head's outputs. Stops the model's
    forward after its head (the rest, float32 NMS, is detectron2's)."""
    seen = {}

    def capture(_module, args, out):
        seen.update(inputs=args[0], out=out)
        raise _HeadRan

    handle = model.head.register_forward_hook(capture)
    try:
        with torch.no_grad():
            try:
                model([{"image": image} for image in images])
            except _HeadRan:
                pass
            x = (images.double() - model.pixel_mean) / model.pixel_std
            fpn = model.backbone
            bottom_up = restated_san if isinstance(fpn.bottom_up, SANBackbone) else restated_resnet
            features = restated_fpn(fpn, x, bottom_up=lambda y: bottom_up(fpn.bottom_up, y))
            expected_inputs = [features[f] for f in model.head_in_features]
            restated_head = (
                restated_attention_head
                if isinstance(model.head, AttentionRetinaNetHead)
                else restated_conv_head
            )
            expected_out = restated_head(model.head, expected_inputs)
    finally:
        handle.remove()
    assert "inputs" in seen, "the head did not run"
    assert len(seen["inputs"]) == len(expected_inputs)
    for level, (actual, expected) in enumerate(zip(seen["inputs"], expected_inputs)):
        assert_close_f64(actual, expected, f"head input {level}")
    for kind, actual_levels, expected_levels in zip(("logits", "boxes"), seen["out"], expected_out):
        for level, (actual, expected) in enumerate(zip(actual_levels, expected_levels)):
            assert_close_f64(actual, expected, f"{kind} level {level}")
