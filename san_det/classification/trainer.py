"""``ClassificationTrainer``: san_det's trainer for ImageNet-style classification.

It is :class:`~san_det.engine.trainer.RobustTrainer` (detectron2's ``DefaultTrainer`` made
crash-safe and resumable: atomic strict checkpoints, NaN/inf guard, seeded resumable data stream,
DDP on GPUs or CPU processes through ``launch``), so everything but the task is detectron2's:
``SimpleTrainer`` / ``AMPTrainer`` (``SOLVER.AMP.ENABLED``, GPU), ``WarmupCosineLR``, the iteration
timer, periodic checkpoints and evaluation, and the console / JSON / TensorBoard event writers.
This class supplies the classification data loaders, the optimizer of the recipe, the top-1 /
top-5 evaluator (plus SAN's robustness variants), the weight EMA, and a checkpoint entry recording
the classifier's input normalisation (checked when the weights are loaded into a detector).

Usage (``train_net.py`` does this when ``MODEL.META_ARCHITECTURE`` is ``ImageClassifier``)::

    trainer = ClassificationTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    ClassificationTrainer.test(cfg, model)  # --eval-only
"""

import logging
from collections import OrderedDict

import torch
from detectron2.engine import hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler
from detectron2.utils import comm

from ..data.image_folder import register_imagenet
from ..engine.trainer import RobustTrainer
from .checkpoint import CLASSIFIER_INFO_KEY, ClassifierInfo, classifier_info_from_cfg
from .classifier import ImageClassifier
from .ema import EMAHook, ModelEMA
from .evaluator import ClassificationEvaluator, VariantLoader, apply_variant
from .loader import (
    build_classification_test_loader,
    build_classification_train_loader,
    get_classification_dataset_dicts,
)
from .solver import build_classification_optimizer, resolve_classification_schedule
from .validate import check_classification_keys, probe_classifier

__all__ = ["ClassificationTrainer"]

logger = logging.getLogger(__name__)


def _prepare_datasets(cfg) -> None:
    if cfg.CLASSIFICATION.IMAGENET_ROOT:
        register_imagenet(cfg.CLASSIFICATION.IMAGENET_ROOT)


class ClassificationTrainer(RobustTrainer):
    """See the module docstring. ``cfg`` is resolved first: LR scaled by ``IMS_PER_BATCH / 256``,
    epoch settings turned into iterations (:func:`resolve_classification_schedule`)."""

    def __init__(self, cfg):
        _prepare_datasets(cfg)
        self._train_dicts = get_classification_dataset_dicts(
            cfg.DATASETS.TRAIN, cfg.CLASSIFICATION.NUM_CLASSES
        )
        cfg = resolve_classification_schedule(cfg, len(self._train_dicts))
        self.ema = None
        super().__init__(cfg)
        del self._train_dicts  # the loader holds its own (serialised) copy

    config_probe = staticmethod(probe_classifier)
    config_checks = (check_classification_keys,)

    @classmethod
    def build_model(cls, cfg):
        model = build_model(cfg)
        if not isinstance(model, ImageClassifier):
            raise ValueError(
                f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r} built a "
                f"{type(model).__name__}, not an ImageClassifier"
            )
        logger.info("Model:\n{}".format(model))
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_classification_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    def build_train_loader(self, cfg):
        # An instance method: reuses the dicts read in __init__ (ImageNet is listed only once).
        dicts = getattr(self, "_train_dicts", None)
        return build_classification_train_loader(cfg, dataset=dicts)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_classification_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return ClassificationEvaluator(dataset_name, num_classes=cfg.CLASSIFICATION.NUM_CLASSES)

    def build_checkpointer(self, cfg, model):
        checkpointer = super().build_checkpointer(cfg, model)
        info = ClassifierInfo(classifier_info_from_cfg(cfg))
        checkpointer.add_checkpointable(CLASSIFIER_INFO_KEY, info)
        return checkpointer

    def build_hooks(self):
        cfg = self.cfg
        ret = super().build_hooks()
        if not cfg.CLASSIFICATION.EMA.ENABLED:
            return ret
        self.ema = ModelEMA(self.model, cfg.CLASSIFICATION.EMA.DECAY, cfg.CLASSIFICATION.EMA.RAMP)
        ema_hook = EMAHook(
            self.ema,
            cfg.OUTPUT_DIR,
            extra=lambda: {CLASSIFIER_INFO_KEY: classifier_info_from_cfg(cfg)},
        )
        # After the LR scheduler, before checkpointing and evaluation (which use the EMA).
        at = next(i for i, h in enumerate(ret) if isinstance(h, hooks.LRScheduler)) + 1
        ret.insert(at, ema_hook)
        if cfg.CLASSIFICATION.EMA.EVAL:
            ema = self.ema

            def test_ema():
                return {"ema": self.test(cfg, ema.module)}

            at = max(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)) + 1
            ret.insert(at, hooks.EvalHook(cfg.TEST.EVAL_PERIOD, test_ema))
        return ret

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Top-1 / top-5 on every ``DATASETS.TEST`` set, and on its robustness variants.

        Returns:
            ``{dataset: {"classification": {...}}}`` (variants as ``"<dataset>@<variant>"``),
            or the inner dict alone when there is a single entry, as ``DefaultTrainer.test``.
        """
        _prepare_datasets(cfg)
        if evaluators is not None and len(evaluators) != len(cfg.DATASETS.TEST):
            raise ValueError(
                f"{len(evaluators)} evaluators for {len(cfg.DATASETS.TEST)} test datasets"
            )
        variants = list(cfg.CLASSIFICATION.TEST.ROBUSTNESS_VARIANTS)
        for v in variants:
            apply_variant(torch.zeros(1, 2, 2), v)  # unknown names fail before any evaluation
        results = OrderedDict()
        for idx, name in enumerate(cfg.DATASETS.TEST):
            loader = cls.build_test_loader(cfg, name)
            for variant in [None] + variants:
                if evaluators is not None and variant is None:
                    evaluator = evaluators[idx]
                else:
                    evaluator = cls.build_evaluator(cfg, name)
                key = name if variant is None else f"{name}@{variant}"
                data = loader if variant is None else VariantLoader(loader, variant)
                results[key] = inference_on_dataset(model, data, evaluator)
                if comm.is_main_process():
                    logger.info(f"Evaluation results for {key} in csv format:")
                    print_csv_format(results[key])
        if variants and comm.is_main_process():
            _log_robustness(results, cfg.DATASETS.TEST, variants)
        if len(results) == 1:
            return list(results.values())[0]
        return results


def _log_robustness(results, names, variants) -> None:
    for name in names:
        clean = results[name].get("classification", {}).get("top1")
        if clean is None:
            continue
        drops = ", ".join(
            f"{v}: {results[f'{name}@{v}']['classification']['top1']:.2f}" for v in variants
        )
        logger.info(f"Robustness of {name}: top-1 clean {clean:.2f}; {drops}")
