"""A PNG of attention maps: per pixel, an overview panel and one heat panel per head / group."""

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..utils.atomic import atomic_write
from .weights import AttentionMap

__all__ = ["LABEL_HEIGHT", "render_attention_png"]

LABEL_HEIGHT = 16  # pixels of the caption strip above every panel of the PNG


class _Window(NamedTuple):
    """Where one map's window lies in image pixels, and the box of its zoomed panels."""

    cy: float  # window centre
    cx: float
    half: float  # half the window span
    box: Tuple[float, float, float, float]  # (x0, y0, x1, y1) shown by a zoomed panel
    scale: float  # panel pixels per image pixel in a zoomed panel


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
    _check_render_arguments(image, maps, pixel_size, max_groups, labels)
    groups = min(maps[0].weights.shape[0], max_groups)
    rows = []
    for row_index, amap in enumerate(maps):
        window = _window(amap, pixel_size, panel_size)
        label = (
            labels[row_index] if labels is not None else f"y={int(window.cy)} x={int(window.cx)}"
        )
        panels = [_labelled(_overview_panel(image, window, panel_size), label)]
        base = _crop(image, window.box, panel_size).convert("RGBA")
        for g in range(groups):
            panels.append(_group_panel(base, amap, g, window, pixel_size))
        rows.append(_side_by_side(panels, panel_size))
    figure = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), (255, 255, 255))
    for idx, row in enumerate(rows):
        figure.paste(row, (0, idx * row.height))
    with atomic_write(path) as f:  # no partial PNG, whatever stops the process
        figure.save(f, format="PNG")
    return figure.size


def _check_render_arguments(image, maps, pixel_size, max_groups, labels) -> None:
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


def _window(amap: AttentionMap, pixel_size: float, panel_size: int) -> _Window:
    r, dil = amap.kernel_size // 2, amap.dilation
    cy, cx = ((c + 0.5) * pixel_size for c in amap.centre)
    half = (r * dil + 0.5) * pixel_size
    margin = 0.25 * half
    box = (cx - half - margin, cy - half - margin, cx + half + margin, cy + half + margin)
    return _Window(cy, cx, half, box, panel_size / (box[2] - box[0]))


def _overview_panel(image: np.ndarray, window: _Window, panel_size: int) -> Image.Image:
    """The whole image (padded square) with the window outlined and its centre crossed."""
    side = max(image.shape[:2])
    overview = _crop(image, (0, 0, side, side), panel_size)
    draw = ImageDraw.Draw(overview)
    s = panel_size / side
    cy, cx, half = window.cy, window.cx, window.half
    draw.rectangle(
        [(cx - half) * s, (cy - half) * s, (cx + half) * s, (cy + half) * s], outline=(0, 255, 0)
    )
    draw.line([(cx * s - 4, cy * s), (cx * s + 4, cy * s)], fill=(255, 0, 0), width=2)
    draw.line([(cx * s, cy * s - 4), (cx * s, cy * s + 4)], fill=(255, 0, 0), width=2)
    return overview


def _group_panel(
    base: Image.Image, amap: AttentionMap, group: int, window: _Window, pixel_size: float
) -> Image.Image:
    """``base`` (the zoomed image) with the weights of head / group ``group`` as heat cells."""
    k, r, dil = amap.kernel_size, amap.kernel_size // 2, amap.dilation
    signed = amap.kind == "san_patchwise"
    weights = amap.weights[group].float().cpu()
    peak = float(weights.abs().max()) or 1.0
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for a in range(k):
        for b in range(k):
            if not amap.inside[a, b] and amap.kind == "sasa":
                continue  # masked out of the softmax: weight 0 by construction
            y0 = (window.cy - window.half + (a * dil) * pixel_size - window.box[1]) * window.scale
            x0 = (window.cx - window.half + (b * dil) * pixel_size - window.box[0]) * window.scale
            cell = [
                x0,
                y0,
                x0 + pixel_size * window.scale - 1,
                y0 + pixel_size * window.scale - 1,
            ]
            value = float(weights[a, b]) / peak
            alpha = int(50 + 170 * abs(value))  # small weights: a light tint only
            draw.rectangle(cell, fill=_colour(value, signed) + (alpha,))
            if a == r and b == r:
                draw.rectangle(cell, outline=(255, 255, 255, 255), width=2)
    panel = Image.alpha_composite(base, overlay).convert("RGB")
    short = "head" if amap.group_name == "head" else "group"
    return _labelled(panel, f"{short} {group} max {float(weights.max()):.2f}")


def _side_by_side(panels: List[Image.Image], panel_size: int) -> Image.Image:
    row = Image.new("RGB", (panel_size * len(panels), panel_size + LABEL_HEIGHT))
    for idx, panel in enumerate(panels):
        row.paste(panel, (idx * panel_size, 0))
    return row
