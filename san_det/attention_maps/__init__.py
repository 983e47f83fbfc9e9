"""Attention weights of one layer of a model, for chosen pixels, and a PNG that shows them.

Two kinds of layer are understood:

- SASA (:class:`~san_det.layers.local_attention.LocalSelfAttention2d`): a forward hook records the
  layer's input ``x``; for a pixel ``(i, j)`` the weights are the probabilities the layer's own op
  (``torch.ops.san_det.local_attention``, the op :func:`~san_det.layers.ops.local_attention` runs)
  computes from the layer's projections and relative embeddings::

      w[h, a, b] = softmax_{a, b in image}(sum_{c in h} q[c, i, j] * (k[c, i', j'] + rel[c, a, b]))

  with ``(i', j') = (i + (a - r) * dilation, j + (b - r) * dilation)``, ``r = kernel_size // 2``;
  neighbours outside the image get weight 0 (they are masked out of the softmax). One ``k x k``
  map per head.
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

Modules: :mod:`.layers` (finding and describing attention layers), :mod:`.weights` (the
:class:`AttentionMap` record and the SASA weights from the op), :mod:`.capture` (the hooks),
:mod:`.render` (the PNG).
"""

from .capture import AttentionCapture
from .layers import attention_layers, describe_attention_layer, resolve_attention_layer
from .render import LABEL_HEIGHT, render_attention_png
from .weights import AttentionMap, local_attention_weights

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
