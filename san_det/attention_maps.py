"""Attention weights of one layer of a model, for chosen pixels, and a PNG that shows them.

Two kinds of layer are understood:

- SASA (:class:`~san_det.layers.local_attention.LocalSelfAttention2d`): a forward hook records the
  layer's input ``x``; for a pixel ``(i, j)`` the weights are recomputed with the operator's
  formula from the layer's own projections and relative embeddings::

      w[h, a, b] = softmax_{a, b in image}(sum_{c in h} q[c, i, j] * (k[c, i', j'] + rel[c, a, b]))

  with ``(i', j') = (i + (a - r) * dilation, j + (b - r) * dilation)``, ``r = kernel_size // 2``;
  neighbours outside the image get weight 0 (they are masked out of the softmax, as in
  :func:`~san_det.layers.local_attention.local_attention`). One ``k x k`` map per head.
- SAN (:class:`~san_det.layers.san_attention.SAM`): a forward hook on the module's ``conv_w``
  (gamma) records its output, i.e. the weights the module aggregates with: ``softmax`` over the
  taps for pairwise SAM, the raw (possibly negative) weights for patchwise SAM. One ``k x k`` map
  per attention-weight channel ("channel group": output channel ``c`` uses group
  ``c % (out_planes // share_planes)``). Taps outside the image read mirrored or zero pixels
  (``pad_mode``) and keep their weights.

Usage (see also ``tools/visualize_attention.py``)::

    with AttentionCapture(model, "backbone.bottom_up.res3.0.conv2") as capture:
        model(inputs)
    maps = capture.maps([(5, 7)])  # pixels in the coordinates of the layer's attention grid
    render_attention_png(image_rgb, maps, "out.png", pixel_size=8.0)

Layer names are ``model.named_modules()`` names; a module holding exactly one attention layer
(e.g. a SASA bottleneck's ``conv2``, a SAN block) stands for that layer.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from san_det.layers.local_attention import LocalSelfAttention2d
from san_det.layers.san_attention import SAM

__all__ = [
    "LABEL_HEIGHT",
    "AttentionCapture",
    "AttentionMap",
    "attention_layers",
    "describe_attention_layer",
    "local_attention_weights",
    "render_attention_png",
    "resolve_attention_layer",
]

ATTENTION_TYPES = (LocalSelfAttention2d, SAM)
LABEL_HEIGHT = 16  # pixels of the caption strip above every panel of the PNG


@dataclass
class AttentionMap:
    """The attention weights of one layer at one pixel.

    Attributes:
        layer: the layer's module name.
        kind: "sasa", "san_pairwise" or "san_patchwise".
        pixel: ``(i, j)`` on the layer's attention grid (its output grid before any pooling).
        centre: ``(row, col)`` of the window centre on the layer's input grid (equal to ``pixel``
            unless the layer has a stride, as SAN modules may).
        weights: ``(G, k, k)`` float tensor; ``G`` heads (SASA) or channel groups (SAN).
        inside: ``(k, k)`` bool tensor, True where the tap lies inside the image.
        dilation: spacing between taps, in input-grid pixels.
        group_name: "head" or "channel group".
    """

    layer: str
    kind: str
    pixel: Tuple[int, int]
    centre: Tuple[int, int]
    weights: torch.Tensor
    inside: torch.Tensor
    dilation: int
    group_name: str

    @property
    def kernel_size(self) -> int:
        return self.weights.shape[-1]


def attention_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """``{name: module}`` of every SASA and SAN attention layer of ``model``, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ATTENTION_TYPES)}


def describe_attention_layer(module: nn.Module) -> str:
    """A one-line description of an attention layer (kind, channels, window, heads, stride)."""
    if isinstance(module, LocalSelfAttention2d):
        text = (
            f"SASA local attention {module.in_channels}->{module.out_channels}, "
            f"k={module.kernel_size}, {module.num_heads} heads"
        )
        if module.stride > 1:
            text += f", then {module.stride}x{module.stride} average pool"
    elif isinstance(module, SAM):
        kind = "pairwise" if module.sa_type == 0 else "patchwise"
        text = (
            f"SAN {kind} SAM ({module.relation}), {module.out_planes} channels, "
            f"k={module.kernel_size}, {module.weight_planes} channel groups"
        )
        if module.stride > 1:
            text += f", stride {module.stride}"
    else:
        raise ValueError(f"not an attention layer: {type(module).__name__}")
    if module.dilation > 1:
        text += f", dilation {module.dilation}"
    return text


def resolve_attention_layer(model: nn.Module, name: str) -> Tuple[str, nn.Module]:
    """The attention layer called ``name`` in ``model`` (or the only one inside module ``name``).

    Returns:
        ``(full_name, module)``.

    Raises:
        ValueError: naming ``name`` and listing attention layers, when ``name`` is not a module,
            holds no attention layer, or holds several.
    """
    layers = attention_layers(model)
    modules = dict(model.named_modules())
    if name not in modules:
        examples = ", ".join(list(layers)[:4]) or "none: the model has no attention layer"
        raise ValueError(
            f"layer {name!r} is not a module of the model; attention layers include {examples} "
            f"(list them all with --list-layers)"
        )
    if name in layers:
        return name, layers[name]
    prefix = f"{name}." if name else ""
    inner = [n for n in layers if n.startswith(prefix)]
    if len(inner) == 1:
        return inner[0], layers[inner[0]]
    if not inner:
        raise ValueError(
            f"layer {name!r} ({type(modules[name]).__name__}) holds no SASA or SAN attention "
            f"layer (list them with --list-layers)"
        )
    shown = ", ".join(inner[:4]) + (", ..." if len(inner) > 4 else "")
    raise ValueError(f"layer {name!r} holds {len(inner)} attention layers ({shown}): pick one")


def _window_inside(height, width, centre, kernel_size, dilation, device) -> torch.Tensor:
    r = kernel_size // 2
    offsets = (torch.arange(kernel_size, device=device) - r) * dilation
    rows, cols = centre[0] + offsets, centre[1] + offsets
    row_ok = (rows >= 0) & (rows < height)
    col_ok = (cols >= 0) & (cols < width)
    return row_ok[:, None] & col_ok[None, :]


def _check_pixels(pixels, height: int, width: int, what: str) -> List[Tuple[int, int]]:
    checked = []
    for p in pixels:
        if len(p) != 2:
            raise ValueError(f"pixels must be (row, col) pairs, got {p!r}")
        i, j = int(p[0]), int(p[1])
        if not (0 <= i < height and 0 <= j < width):
            raise ValueError(f"pixel {(i, j)} lies outside the {height}x{width} {what}")
        checked.append((i, j))
    return checked


def local_attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    rel: Optional[torch.Tensor],
    pixels: Sequence[Tuple[int, int]],
    *,
    num_heads: int,
    kernel_size: int,
    dilation: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SASA attention weights (:func:`~san_det.layers.local_attention.local_attention`) at pixels.

    Args:
        q, k: queries and keys ``(N, C, H, W)``; heads are contiguous groups of ``C / num_heads``.
        rel: relative embeddings ``(C, k, k)`` added to the keys, or ``None``.
        pixels: ``(i, j)`` positions inside ``H x W``.

    Returns:
        ``weights (N, P, num_heads, k, k)``: the softmax over in-image neighbours of
        ``q . (k + rel)`` (0 outside the image), and ``inside (P, k, k)`` (bool).
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(
            f"q and k must have the same shape (N, C, H, W), got {tuple(q.shape)} and "
            f"{tuple(k.shape)}"
        )
    n, c, h, w = q.shape
    if c % num_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must divide the channel count C={c}")
    pixels = _check_pixels(pixels, h, w, "attention grid")
    d, pad = c // num_heads, (kernel_size // 2) * dilation
    span = 2 * pad + 1
    keys = F.pad(k, (pad, pad, pad, pad))
    if rel is not None:
        rel = rel.reshape(1, num_heads, d, kernel_size, kernel_size)
    all_weights, all_inside = [], []
    for i, j in pixels:
        window = keys[:, :, i : i + span : dilation, j : j + span : dilation]
        window = window.reshape(n, num_heads, d, kernel_size, kernel_size)
        if rel is not None:
            window = window + rel
        query = q[:, :, i, j].reshape(n, num_heads, d, 1, 1)
        logits = (query * window).sum(dim=2)  # (N, heads, k, k)
        inside = _window_inside(h, w, (i, j), kernel_size, dilation, q.device)
        logits = logits.masked_fill(~inside, float("-inf"))
        weights = torch.softmax(logits.flatten(2), dim=-1).view_as(logits)
        all_weights.append(weights)
        all_inside.append(inside)
    return torch.stack(all_weights, dim=1), torch.stack(all_inside)


class AttentionCapture:
    """Context manager recording what one attention layer of a model sees during forwards.

    Args:
        model: the model (any ``nn.Module``).
        layer: the layer's name (see :func:`resolve_attention_layer`).

    Each forward call of the layer inside the ``with`` block is recorded (a layer shared across
    FPN levels, as RetinaNet's head layers are, is called once per level): SASA layers keep their
    input, SAN modules the output of ``conv_w``. :meth:`maps` turns one call into weights.
    """

    def __init__(self, model: nn.Module, layer: str):
        self.name, self.module = resolve_attention_layer(model, layer)
        self.calls: List[dict] = []
        self._handles = []

    def __enter__(self) -> "AttentionCapture":
        self.calls.clear()
        if isinstance(self.module, LocalSelfAttention2d):
            self._handles.append(self.module.register_forward_hook(self._record_sasa))
        else:
            self._handles.append(self.module.conv_w.register_forward_hook(self._record_san_w))
            self._handles.append(self.module.register_forward_hook(self._record_san))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record_sasa(self, module, inputs, output) -> None:
        x = inputs[0].detach()
        self.calls.append({"input": x, "grid": tuple(x.shape[-2:]), "input_grid": x.shape[-2:]})

    def _record_san_w(self, module, inputs, output) -> None:
        self.calls.append({"conv_w": output.detach()})

    def _record_san(self, module, inputs, output) -> None:
        call = self.calls[-1]
        call["grid"] = tuple(output.shape[-2:])
        call["input_grid"] = tuple(inputs[0].shape[-2:])

    @property
    def grid_size(self) -> Tuple[int, int]:
        """``(H, W)`` of the attention grid of the first recorded call."""
        if not self.calls:
            raise RuntimeError(f"layer {self.name!r} was not called inside the capture block")
        return self.calls[0]["grid"]

    def input_grid_size(self, call: int = 0) -> Tuple[int, int]:
        """``(H, W)`` of the layer's input in recorded call ``call``."""
        return tuple(self._call(call)["input_grid"])

    def _call(self, call: int) -> dict:
        if not self.calls:
            raise RuntimeError(f"layer {self.name!r} was not called inside the capture block")
        if not 0 <= call < len(self.calls):
            raise ValueError(
                f"call {call} out of range: layer {self.name!r} was called {len(self.calls)} "
                f"time(s) (0..{len(self.calls) - 1})"
            )
        return self.calls[call]

    @torch.no_grad()
    def maps(
        self, pixels: Sequence[Tuple[int, int]], call: int = 0, batch_index: int = 0
    ) -> List[AttentionMap]:
        """Attention maps at ``pixels`` (``(i, j)`` on the attention grid) of recorded call
        ``call`` and image ``batch_index`` of its batch; one :class:`AttentionMap` per pixel."""
        record = self._call(call)
        m = self.module
        if isinstance(m, LocalSelfAttention2d):
            x = record["input"]
            if not 0 <= batch_index < x.shape[0]:
                raise ValueError(f"batch_index {batch_index} outside the batch of {x.shape[0]}")
            x = x[batch_index : batch_index + 1]
            q, k = m.query(x), m.key(x)
            rel = m.relative_embedding().to(q.dtype)
            weights, inside = local_attention_weights(
                q, k, rel, pixels,
                num_heads=m.num_heads, kernel_size=m.kernel_size, dilation=m.dilation,
            )  # fmt: skip
            checked = _check_pixels(pixels, *record["grid"], "attention grid")
            return [
                AttentionMap(self.name, "sasa", p, p, weights[0, t], inside[t], m.dilation, "head")
                for t, p in enumerate(checked)
            ]
        w = record["conv_w"]
        if not 0 <= batch_index < w.shape[0]:
            raise ValueError(f"batch_index {batch_index} outside the batch of {w.shape[0]}")
        ho, wo = record["grid"]
        taps = m.kernel_size * m.kernel_size
        w = w[batch_index : batch_index + 1]
        if m.sa_type == 0:
            w = torch.softmax(w, dim=-2)
            kind = "san_pairwise"
        else:
            kind = "san_patchwise"
        w = w.reshape(m.weight_planes, taps, ho, wo)
        h_in, w_in = record["input_grid"]
        result = []
        for i, j in _check_pixels(pixels, ho, wo, "attention grid"):
            centre = (i * m.stride, j * m.stride)
            inside = _window_inside(h_in, w_in, centre, m.kernel_size, m.dilation, w.device)
            weights = w[:, :, i, j].reshape(m.weight_planes, m.kernel_size, m.kernel_size)
            result.append(
                AttentionMap(
                    self.name, kind, (i, j), centre, weights, inside, m.dilation, "channel group"
                )
            )
        return result


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------


def _colour(value: float, signed: bool) -> Tuple[int, int, int]:
    """A heat colour for ``value`` in [0, 1] (or [-1, 1] when ``signed``)."""
    from matplotlib import colormaps

    if signed:
        rgba = colormaps["coolwarm"](0.5 + 0.5 * value)
    else:
        rgba = colormaps["inferno"](0.15 + 0.85 * value)
    return tuple(int(round(255 * c)) for c in rgba[:3])


def _crop(image: np.ndarray, box: Tuple[float, float, float, float], size: int) -> Image.Image:
    """``box`` (x0, y0, x1, y1) of ``image`` (H, W, 3 uint8) resized to ``size x size``; parts
    outside the image are grey."""
    x0, y0, x1, y1 = box
    scale = size / (x1 - x0)
    h, w = image.shape[:2]
    canvas = Image.new("RGB", (size, size), (96, 96, 96))
    # The part of the box inside the image, in image and in panel coordinates.
    ix0, iy0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    ix1, iy1 = min(w, math.ceil(x1)), min(h, math.ceil(y1))
    if ix1 <= ix0 or iy1 <= iy0:
        return canvas
    piece = Image.fromarray(image[iy0:iy1, ix0:ix1])
    px0, py0 = round((ix0 - x0) * scale), round((iy0 - y0) * scale)
    px1, py1 = round((ix1 - x0) * scale), round((iy1 - y0) * scale)
    if px1 > px0 and py1 > py0:
        canvas.paste(piece.resize((px1 - px0, py1 - py0), Image.BILINEAR), (px0, py0))
    return canvas


def _labelled(panel: Image.Image, text: str) -> Image.Image:
    out = Image.new("RGB", (panel.width, panel.height + LABEL_HEIGHT), (255, 255, 255))
    out.paste(panel, (0, LABEL_HEIGHT))
    ImageDraw.Draw(out).text((3, 2), text, fill=(0, 0, 0))
    return out


def render_attention_png(
    image: np.ndarray,
    maps: Sequence[AttentionMap],
    path: str,
    *,
    pixel_size: float,
    panel_size: int = 160,
    max_groups: int = 16,
    labels: Optional[Sequence[str]] = None,
) -> Tuple[int, int]:
    """Save a PNG of attention maps overlaid on ``image``; returns its ``(width, height)``.

    Layout: one row per map (pixel); the first panel shows the whole image with the pixel (cross)
    and the window (box); then one panel per head / channel group (at most ``max_groups``): the
    image around the pixel with each tap's weight as a heat colour (scaled to the panel's largest
    weight, printed in its caption; signed weights of patchwise SAN in blue-red), the centre tap
    outlined, taps outside the image left uncoloured on grey. Every panel is
    ``panel_size x (panel_size + LABEL_HEIGHT)`` pixels, so the PNG is
    ``(1 + min(G, max_groups)) * panel_size`` wide and ``len(maps) * (panel_size + LABEL_HEIGHT)``
    high.

    Args:
        image: ``(H, W, 3)`` uint8 RGB, the picture the maps are drawn on.
        maps: maps of one layer (same kernel size and group count).
        path: output PNG path.
        pixel_size: size in ``image`` pixels of one pixel of the layer's input grid (the layer's
            stride relative to ``image``, e.g. 8.0 for a stride-8 layer on an unresized image).
        panel_size: side of every panel in pixels.
        max_groups: most heads / channel groups drawn per row.
        labels: caption of each row's first panel (default: the window centre in image pixels).
    """
    if not maps:
        raise ValueError("maps is empty: give at least one pixel")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    if pixel_size <= 0:
        raise ValueError(f"pixel_size must be > 0, got {pixel_size}")
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups}")
    if labels is not None and len(labels) != len(maps):
        raise ValueError(f"labels must give one caption per map ({len(maps)}), got {len(labels)}")
    groups = min(maps[0].weights.shape[0], max_groups)
    h, w = image.shape[:2]
    rows = []
    for row_index, amap in enumerate(maps):
        k, r, dil = amap.kernel_size, amap.kernel_size // 2, amap.dilation
        cy, cx = ((c + 0.5) * pixel_size for c in amap.centre)  # window centre, image px
        half = (r * dil + 0.5) * pixel_size  # half the window span
        margin = 0.25 * half
        box = (cx - half - margin, cy - half - margin, cx + half + margin, cy + half + margin)
        scale = panel_size / (box[2] - box[0])

        side = max(h, w)
        overview = _crop(image, (0, 0, side, side), panel_size)
        draw = ImageDraw.Draw(overview)
        s = panel_size / side
        draw.rectangle(
            [(cx - half) * s, (cy - half) * s, (cx + half) * s, (cy + half) * s],
            outline=(0, 255, 0),
        )
        draw.line([(cx * s - 4, cy * s), (cx * s + 4, cy * s)], fill=(255, 0, 0), width=2)
        draw.line([(cx * s, cy * s - 4), (cx * s, cy * s + 4)], fill=(255, 0, 0), width=2)
        label = labels[row_index] if labels is not None else f"y={int(cy)} x={int(cx)}"
        panels = [_labelled(overview, label)]

        signed = amap.kind == "san_patchwise"
        base = _crop(image, box, panel_size).convert("RGBA")
        for g in range(groups):
            weights = amap.weights[g].float().cpu()
            peak = float(weights.abs().max()) or 1.0
            overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
            draw = ImageDraw.Draw(overlay)
            for a in range(k):
                for b in range(k):
                    y0 = (cy - half + (a * dil) * pixel_size - box[1]) * scale
                    x0 = (cx - half + (b * dil) * pixel_size - box[0]) * scale
                    cell = [x0, y0, x0 + pixel_size * scale - 1, y0 + pixel_size * scale - 1]
                    if not amap.inside[a, b] and amap.kind == "sasa":
                        continue  # masked out of the softmax: weight 0 by construction
                    value = float(weights[a, b]) / peak
                    alpha = int(50 + 170 * abs(value))  # small weights: a light tint only
                    draw.rectangle(cell, fill=_colour(value, signed) + (alpha,))
                    if a == r and b == r:
                        draw.rectangle(cell, outline=(255, 255, 255, 255), width=2)
            panel = Image.alpha_composite(base, overlay).convert("RGB")
            short = "head" if amap.group_name == "head" else "group"
            caption = f"{short} {g} max {float(weights.max()):.2f}"
            panels.append(_labelled(panel, caption))
        row = Image.new("RGB", (panel_size * len(panels), panel_size + LABEL_HEIGHT))
        for idx, panel in enumerate(panels):
            row.paste(panel, (idx * panel_size, 0))
        rows.append(row)
    figure = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), (255, 255, 255))
    for idx, row in enumerate(rows):
        figure.paste(row, (0, idx * row.height))
    figure.save(path, format="PNG")
    return figure.size
