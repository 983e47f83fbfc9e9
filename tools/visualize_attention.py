#!/usr/bin/env python
"""Draw the attention weights of one layer of a trained san_det model at chosen image pixels.

For SASA layers: one ``k x k`` map per head (the softmax of ``q . (k + r)`` over the pixel's
window); for SAN modules: one map per attention-weight channel group. Each row of the PNG is one
pixel: the whole image with the pixel and the window marked, then the maps overlaid on the image
around the pixel. See :mod:`san_det.attention_maps`.

Examples::

    # which layers can be drawn
    python tools/visualize_attention.py --config-file configs/Demo/shapes_retinanet.yaml \\
        --list-layers MODEL.WEIGHTS output/shapes_demo/model_final.pth

    python tools/visualize_attention.py --config-file configs/Demo/shapes_retinanet.yaml \\
        --input img.jpg --layer backbone.bottom_up.res3.0.conv2 --pixels 40,64 90,30 \\
        --output attention.png MODEL.WEIGHTS output/shapes_demo/model_final.pth

Pixels are ``row,col`` (``y,x``) in the input image's own pixels; each is mapped to the layer's
grid through the test-time resize and the layer's stride. Trailing ``KEY VALUE`` pairs override
config entries. Bad input (file, layer, pixel, checkpoint) ends with a one-line error, status 2.
"""

import argparse
import logging
import os
import sys
from typing import List, Sequence, Tuple

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run from a checkout without installing san_det
    sys.path.insert(0, _ROOT)

import san_det  # noqa: E402,F401  (patches detectron2 0.6 where needed; registers san_det)
import torch  # noqa: E402

EXIT_BAD_INPUT = 2
logger = logging.getLogger("visualize_attention")


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Draw a layer's attention weights (per head / channel group) at image pixels.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, help="the model's config (yaml)")
    parser.add_argument("--list-layers", action="store_true", help="list attention layers, exit")
    parser.add_argument("--input", help="image file (any format Pillow reads)")
    parser.add_argument(
        "--layer",
        help="module name of an attention layer, or of a module holding exactly one "
        "(e.g. backbone.bottom_up.res3.0.conv2)",
    )
    parser.add_argument(
        "--pixels", nargs="+", default=[], metavar="Y,X", help="pixels as row,col of the image"
    )
    parser.add_argument("--output", default="attention.png", help="PNG to write")
    parser.add_argument(
        "--call",
        type=int,
        default=0,
        help="which call of the layer to draw when it runs several times per forward "
        "(RetinaNet head layers: one call per FPN level, 0 = P3)",
    )
    parser.add_argument("--panel-size", type=int, default=160, help="panel side in pixels")
    parser.add_argument(
        "--max-groups", type=int, default=16, help="most heads / channel groups drawn per pixel"
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides"
    )
    return parser


class InputError(ValueError):
    """Bad command-line input: reported in one line."""


def parse_pixels(values: Sequence[str]) -> List[Tuple[int, int]]:
    pixels = []
    for text in values:
        parts = text.split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            pixels.append((int(parts[0]), int(parts[1])))
        except ValueError:
            raise InputError(f"--pixels entries must be Y,X integer pairs, got {text!r}") from None
    return pixels


def build_model(cfg):
    """The config's model in eval mode, with MODEL.WEIGHTS loaded (every tensor, strictly)."""
    from detectron2.modeling import build_model as d2_build_model

    from san_det.engine.checkpoint import SafeCheckpointer, checkpointer_options

    model = d2_build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        SafeCheckpointer(model, **checkpointer_options(cfg)).load(
            cfg.MODEL.WEIGHTS, checkpointables=[], strict=True
        )
    else:
        logger.warning("MODEL.WEIGHTS is empty: drawing the attention of an untrained model")
    return model.eval()


def list_layers(model) -> None:
    from san_det.attention_maps import attention_layers, describe_attention_layer

    layers = attention_layers(model)
    if not layers:
        print("the model has no SASA or SAN attention layer")
        return
    width = max(len(name) for name in layers)
    for name, module in layers.items():
        print(f"{name:<{width}}  {describe_attention_layer(module)}")


def read_image(path: str, fmt: str):
    """``(model input in cfg.INPUT.FORMAT, RGB uint8 for drawing)``; errors name the file."""
    import numpy as np
    from detectron2.data.detection_utils import convert_PIL_to_numpy
    from PIL import Image, ImageOps

    if not path:
        raise InputError("--input is required (an image file)")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"--input {path}: cannot read the image ({e})") from None
    rgb = np.ascontiguousarray(convert_PIL_to_numpy(img, "RGB"))
    return convert_PIL_to_numpy(img, fmt), rgb


def check_output_file(path: str) -> None:
    """``--output`` must name a PNG file that can be written (not a folder)."""
    if os.path.isdir(path):
        raise InputError(f"--output {path} is a folder: name the PNG file to write in it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"--output {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"--output {path}: the folder {folder} is not writable")


def run(args) -> str:
    """Compute and save the maps; returns the output path."""
    import detectron2.data.transforms as T

    from san_det.attention_maps import AttentionCapture, render_attention_png
    from san_det.config import setup_cfg

    cfg = setup_cfg(args.config_file, args.opts)
    if args.list_layers:
        list_layers(build_model(cfg))
        return ""
    # the arguments first: building and loading the model takes seconds and logs
    if not args.layer:
        raise InputError("--layer is required (see --list-layers)")
    pixels = parse_pixels(args.pixels)
    if not pixels:
        raise InputError("--pixels is required: one or more Y,X pairs")
    if args.panel_size < 16:
        raise InputError(f"--panel-size must be >= 16, got {args.panel_size}")
    if args.max_groups < 1:
        raise InputError(f"--max-groups must be >= 1, got {args.max_groups}")
    check_output_file(args.output)
    model = build_model(cfg)
    image, rgb = read_image(args.input, cfg.INPUT.FORMAT)
    height, width = image.shape[:2]
    for y, x in pixels:
        if not (0 <= y < height and 0 <= x < width):
            raise InputError(
                f"--pixels {y},{x} lies outside the {height}x{width} image {args.input}"
            )

    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    resized = resize.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
    model_input = {"image": tensor, "height": height, "width": width}

    try:
        capture = AttentionCapture(model, args.layer)
    except ValueError as e:
        raise InputError(f"--layer: {e}") from None
    padded = {}

    def record_input_size(module, inputs):
        padded.setdefault("shape", inputs[0].shape[-2:])  # the resized, padded batch

    hook = model.backbone.register_forward_pre_hook(record_input_size)
    try:
        with capture, torch.no_grad():
            model([model_input])
    finally:
        hook.remove()
    try:
        grid_h, _ = capture.input_grid_size(args.call)
    except ValueError as e:
        raise InputError(f"--call: {e}") from None

    # One input-grid pixel of the layer in image pixels: (padded input / grid) / resize factor.
    stride = padded["shape"][0] / grid_h
    scale = resized.shape[0] / height
    pixel_size = stride / scale
    att_h, att_w = capture.calls[args.call]["grid"]
    att_pixel_size = pixel_size * (capture.input_grid_size(args.call)[0] / att_h)
    layer_pixels = [
        (min(int(y / att_pixel_size), att_h - 1), min(int(x / att_pixel_size), att_w - 1))
        for y, x in pixels
    ]
    maps = capture.maps(layer_pixels, call=args.call)
    size = render_attention_png(
        rgb,
        maps,
        args.output,
        pixel_size=pixel_size,
        panel_size=args.panel_size,
        max_groups=args.max_groups,
        labels=[f"pixel y={y} x={x}" for y, x in pixels],
    )
    for (y, x), amap in zip(pixels, maps):
        peaks = ", ".join(f"{float(w.max()):.2f}" for w in amap.weights[: args.max_groups])
        print(f"pixel y={y} x={x} -> {capture.name} grid {amap.pixel}: max weight per "
              f"{amap.group_name}: {peaks}")  # fmt: skip
    print(f"wrote {args.output} ({size[0]}x{size[1]} px, layer {capture.name}, "
          f"{pixel_size:g} image px per grid pixel)")  # fmt: skip
    return args.output


def main(argv=None) -> int:
    from san_det.engine import UserInputError

    args = argument_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        run(args)
    except (InputError, UserInputError) as e:
        print(f"visualize_attention.py: error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
