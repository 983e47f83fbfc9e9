#!/usr/bin/env python
"""Train and evaluate san_det models with Detectron2.

Detection (COCO, or the embedded shapes set)::

    python train_net.py --config-file configs/COCO-Detection/retinanet_sasa50.yaml --num-gpus 8
    python train_net.py --config-file configs/Demo/shapes_retinanet.yaml MODEL.DEVICE cpu
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth

Classification (ImageNet pretraining) goes through the same script: configs whose
``MODEL.META_ARCHITECTURE`` is ``ImageClassifier`` use the classification trainer.

Trailing ``KEY VALUE`` pairs override config entries. Bad input (missing config file or dataset,
unknown key, unwritable output folder) is reported in one line, with exit status 2.
"""

import sys

import san_det  # noqa: F401  (patches detectron2 0.6 where needed; registers san_det components)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from san_det.engine import DetectionTrainer, UserInputError, setup_cfg, validate_datasets


def trainer_class(cfg):
    """The trainer for the task the config describes (detection or classification)."""
    if cfg.MODEL.META_ARCHITECTURE == "ImageClassifier":
        from san_det.classification import ClassificationTrainer

        return ClassificationTrainer
    return DetectionTrainer


def setup(args):
    cfg = setup_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    trainer_cls = trainer_class(cfg)
    if args.eval_only:
        model = trainer_cls.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = trainer_cls.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def check_input(args) -> None:
    """Validate config and datasets in the launching process, before any worker starts."""
    cfg = setup_cfg(args.config_file, args.opts)
    if trainer_class(cfg) is DetectionTrainer:
        names = list(cfg.DATASETS.TEST) + ([] if args.eval_only else list(cfg.DATASETS.TRAIN))
        validate_datasets(names)


def cli(argv=None):
    args = default_argument_parser().parse_args(argv)
    try:
        check_input(args)
    except UserInputError as e:
        print(f"train_net.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print("Command Line Args:", args)
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    cli()
