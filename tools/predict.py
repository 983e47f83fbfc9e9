#!/usr/bin/env python
"""Run a trained detector on images: one drawing per image and a COCO-results JSON.

Like detectron2's ``demo/demo.py``::

    python tools/predict.py --config-file output/own_coco_example/config.yaml \\
        --input datasets/shapes_coco/val --output output/own_coco_example/predict \\
        MODEL.WEIGHTS output/own_coco_example/model_final.pth

``--input`` takes image files, folders (their images, not recursive) and globs (quote them:
``"photos/**/*.jpg"``). Images are read and resized exactly as evaluation reads them (16-bit,
RGBA, CMYK, palette and grayscale files as RGB; ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``).
Class names come from the config's dataset (``DATASETS.TEST``, else ``DATASETS.TRAIN``).
``--output`` receives ``<name>.png`` per image, ``coco_instances_results.json`` (detections with
score >= ``--confidence-threshold``; use 0.05 for evaluation-style results) and ``images.json``
(image ids -> file names, categories): see :mod:`san_det.detection.predict`. CPU or GPU as
``MODEL.DEVICE`` says (add ``MODEL.DEVICE cpu`` on a machine without a GPU).

Bad input (config, weights, no image found, an unreadable image, an unwritable output folder,
a classification config) is one line on stderr, exit status 2, and nothing written. Files of the
input folders that are not images (GIFs) are skipped, counted in one warning.

``--output`` is locked while a run writes it (a second run into it is refused in one line, exit
status 2) and a rerun replaces the previous prediction there whole; a folder holding other files
is refused. SIGTERM / SIGINT stop a run within seconds (one line, exit status 143 / 130) and a
full disk is one line, exit status 1: either way ``--output`` keeps what it held before.
"""

import argparse
import logging
import os
import shutil
import sys

import san_det  # noqa: F401  (patches detectron2 0.6 where needed)
from san_det.classification import is_classification_config
from san_det.config import setup_cfg
from san_det.detection.predict import (
    check_images_open,
    check_prediction_output,
    class_metadata,
    collect_images,
    load_detector,
    predict_images,
)
from san_det.detection.predict_output import open_prediction_folder
from san_det.engine.interrupt import Interrupted, interruptible
from san_det.errors import UserInputError

EXIT_BAD_INPUT = 2
EXIT_WRITE_FAILED = 1


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, help="the model's config (.yaml)")
    parser.add_argument("--input", nargs="+", required=True, help="image files, folders, globs")
    parser.add_argument("--output", required=True, help="folder for the drawings and JSON files")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="keep detections with at least this score (drawings and JSON; default 0.5)",
    )
    parser.add_argument(
        "--max-size",
        type=int,
        default=None,
        help="longer side of a drawing, pixels (default TEST.PREDICTION_IMAGE_MAX_SIZE)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def predict(args):
    """Check the input, lock ``--output``, predict; returns :func:`predict_images`' summary."""
    cfg = setup_cfg(args.config_file, args.opts, check_output=False)
    if is_classification_config(cfg):
        raise UserInputError(
            f"{args.config_file} is a classification config (MODEL.META_ARCHITECTURE "
            f"{cfg.MODEL.META_ARCHITECTURE}): tools/predict.py runs detectors; evaluate a "
            "classifier with train_net.py --eval-only"
        )
    files = collect_images(args.input)
    check_images_open(files)
    max_size = cfg.TEST.PREDICTION_IMAGE_MAX_SIZE if args.max_size is None else args.max_size
    check_prediction_output(files, args.output, args.confidence_threshold, max_size)
    metadata = class_metadata(cfg)
    model = load_detector(cfg)
    created = not os.path.exists(args.output)
    lock = open_prediction_folder(args.output)
    try:
        print(f"Predicting on {len(files)} images with {cfg.MODEL.WEIGHTS} ({cfg.MODEL.DEVICE})")
        return predict_images(
            cfg,
            model,
            files,
            args.output,
            args.confidence_threshold,
            max_size,
            metadata,
            report=lambda line: print(line, flush=True),
        )
    except BaseException:
        if created:  # nothing of this run stays, not even the folder
            shutil.rmtree(args.output, ignore_errors=True)
        raise
    finally:
        lock.release()


def main(argv=None) -> int:
    args = argument_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with interruptible(f"the prediction; {args.output} keeps what it held before"):
            summary = predict(args)
    except UserInputError as e:
        print(f"predict.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Interrupted as e:
        print(f"predict.py: {e}", file=sys.stderr)
        return e.code
    except OSError as e:  # a full disk, a file size limit
        print(
            f"predict.py: error: cannot write into {args.output}: {e.strerror or e}; it keeps "
            "what it held before",
            file=sys.stderr,
        )
        return EXIT_WRITE_FAILED
    print(
        f"Wrote {summary['images']} drawings and {summary['detections']} detections (score >= "
        f"{args.confidence_threshold}) to {summary['output_dir']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
