#!/usr/bin/env python
"""Write a small COCO-format dataset laid out like your own data, to try training on it.

Circles, squares and triangles on photo crops (san_det's shapes renderer), with category ids
2, 5, 9 and an unused category 7 ("star"), as real exports often have::

    python tools/make_coco_example.py --output datasets/shapes_coco
    python train_net.py --config-file configs/Demo/own_coco_example.yaml

writes ``<output>/annotations/instances_{train,val}.json`` and ``<output>/{train,val}/*.jpg``
(README, "Train on your own COCO data"). The output folder must not exist or be empty.
"""

import argparse
import sys

import san_det  # noqa: F401  (patches detectron2 0.6 where needed)
from san_det.data.coco_example import write_coco_example

EXIT_BAD_INPUT = 2


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="folder to create")
    parser.add_argument("--num-train", type=int, default=200, help="training images")
    parser.add_argument("--num-val", type=int, default=50, help="validation images")
    parser.add_argument("--image-size", type=int, default=128, help="square image side, pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed (>= 0)")
    return parser


def main(argv=None) -> int:
    args = argument_parser().parse_args(argv)
    try:
        paths = write_coco_example(
            args.output, args.num_train, args.num_val, args.image_size, args.seed
        )
    except (OSError, ValueError) as e:
        print(f"make_coco_example.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for split, (json_file, image_root) in paths.items():
        print(f"{split}: json {json_file}, images {image_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
