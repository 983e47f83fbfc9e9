"""COCO box evaluation that scores a model without a single detection as AP 0, not NaN, and
writes its files whole or not at all.

detectron2's ``COCOEvaluator`` returns NaN for every metric when the model made no detection at
all (an untrained or diverged model, a score threshold above every score): "nan" in the AP
table, and NaN in ``metrics.json``. :class:`COCOEvaluatorNoDetectionsIsZero` reports AP 0 for
every metric instead, with a warning that says why. ``instances_predictions.pth`` and
``coco_instances_results.json`` are written into a staging folder and moved into place when
complete (:func:`~san_det.engine.results_files.staged_results`): a full disk or a signal leaves
no truncated file, and a failed write is a one-line ``ResultsWriteError``.
"""

from typing import Optional

from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from ..engine.results_files import staged_results

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

    def evaluate(self, img_ids=None):
        final = self._output_dir
        if not final or "://" in final or not comm.is_main_process():
            return super().evaluate(img_ids)  # other processes write nothing
        with staged_results(final) as staging:
            self._output_dir = staging
            try:
                return super().evaluate(img_ids)
            finally:
                self._output_dir = final

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
