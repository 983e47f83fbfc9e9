"""COCO box evaluation that scores a model without a single detection as AP 0, not NaN.

detectron2's ``COCOEvaluator`` returns NaN for every metric when the model made no detection at
all (an untrained or diverged model, a score threshold above every score): "nan" in the AP
table, and NaN in ``metrics.json``. :class:`COCOEvaluatorNoDetectionsIsZero` reports AP 0 for
every metric instead, with a warning that says why.
"""

from typing import Optional

from detectron2.evaluation import COCOEvaluator

__all__ = ["COCOEvaluatorNoDetectionsIsZero"]


class COCOEvaluatorNoDetectionsIsZero(COCOEvaluator):
    """``COCOEvaluator`` with AP 0 (and a warning) when there is no detection to evaluate.

    Args:
        *args, **kwargs: as ``COCOEvaluator``.
        no_detections_hint: appended to the warning (e.g. the score threshold key to check).
    """

    def __init__(self, *args, no_detections_hint: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._no_detections_hint = no_detections_hint

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)
        if coco_eval is not None:
            return results
        hint = f" ({self._no_detections_hint})" if self._no_detections_hint else ""
        self._logger.warning(
            f"The model made no detection on {self._metadata.name}: every {iou_type} AP is 0"
            f"{hint}"
        )
        return {metric: 0.0 for metric in results}
