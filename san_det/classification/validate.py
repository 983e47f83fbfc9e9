"""Classification's part of the config check that runs before anything is written.

:class:`~san_det.classification.trainer.ClassificationTrainer` passes these to
:func:`san_det.engine.validate.validate_config`: the schedule keys (epochs against explicit
iteration counts, :func:`~san_det.classification.solver.check_schedule_keys`), the evaluation
batch, and a probe that runs the crop sizes through the classifier built on the meta device.
"""

import torch

from ..engine.errors import UserInputError
from ..engine.validate import run_probe
from .solver import check_schedule_keys

__all__ = ["check_classification_keys", "probe_classifier"]


def check_classification_keys(cfg, *, world_size: int, eval_only: bool) -> None:
    """Schedule and batch keys of ``cfg.CLASSIFICATION`` (errors name the key)."""
    if not eval_only:
        try:
            check_schedule_keys(cfg)
        except ValueError as e:
            raise UserInputError(str(e)) from None
    total = cfg.CLASSIFICATION.TEST.IMS_PER_BATCH
    if total < 1 or total % world_size:
        raise UserInputError(
            f"CLASSIFICATION.TEST.IMS_PER_BATCH must be a positive multiple of the number of "
            f"processes ({world_size}), got {total}"
        )
    i = cfg.CLASSIFICATION.INPUT
    for key in ("TRAIN_CROP_SIZE", "TEST_RESIZE", "TEST_CROP_SIZE"):
        if i[key] < 1:
            raise UserInputError(f"CLASSIFICATION.INPUT.{key} must be >= 1, got {i[key]}")
    if i.TEST_CROP_SIZE > i.TEST_RESIZE:
        raise UserInputError(
            f"CLASSIFICATION.INPUT.TEST_CROP_SIZE ({i.TEST_CROP_SIZE}) is larger than the "
            f"resized image (CLASSIFICATION.INPUT.TEST_RESIZE {i.TEST_RESIZE})"
        )


def probe_classifier(model, cfg, *, world_size: int, eval_only: bool) -> None:
    """Run a batch of training crops (training mode) and of test crops (inference mode) through
    the meta classifier: input size divisibility, SAN's reflection padding, batch norm."""
    i = cfg.CLASSIFICATION.INPUT
    runs = [(False, cfg.CLASSIFICATION.TEST.IMS_PER_BATCH // world_size, i.TEST_CROP_SIZE, "TEST")]
    if not eval_only:
        runs.insert(0, (True, cfg.SOLVER.IMS_PER_BATCH // world_size, i.TRAIN_CROP_SIZE, "TRAIN"))
    for training, batch, size, which in runs:

        def forward():
            images = [torch.empty(3, size, size, device="meta") for _ in range(batch)]
            model.forward_head(model.forward_features(model.preprocess_image(images)))

        what = (
            f"{'training' if training else 'inference'} on {size}x{size} crops "
            f"(CLASSIFICATION.INPUT.{which}_CROP_SIZE, {batch} per process)"
        )
        run_probe(model, training, forward, what)
