"""Top-1 / top-5 accuracy as a detectron2 ``DatasetEvaluator``, and SAN's robustness variants.

:class:`ClassificationEvaluator` counts, per process, how many images have their label among the
``k`` highest logits; :meth:`~ClassificationEvaluator.evaluate` gathers the counts of every process
with ``detectron2.utils.comm.gather`` and sums them on the main process, so the numbers are exact
under distributed evaluation (detectron2's ``InferenceSampler`` gives each image to exactly one
process; an image id seen twice is an error rather than a silently wrong count).

Robustness (SAN, Sec. 5.4): the same evaluation on validation images rotated by 90/180/270 degrees
or flipped upside down, with no retraining; :func:`apply_variant` transforms one image tensor and
:class:`VariantLoader` wraps a test loader so that every image it yields is transformed.
"""

import itertools
import logging
from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Sequence

import numpy as np
import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = ["ClassificationEvaluator", "ROBUSTNESS_VARIANTS", "apply_variant", "VariantLoader"]

logger = logging.getLogger(__name__)

# Each maps a (C, H, W) image to its transformed copy (H == W after the evaluation centre crop).
ROBUSTNESS_VARIANTS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "rot90": lambda x: torch.rot90(x, 1, dims=(1, 2)),
    "rot180": lambda x: torch.rot90(x, 2, dims=(1, 2)),
    "rot270": lambda x: torch.rot90(x, 3, dims=(1, 2)),
    "vflip": lambda x: torch.flip(x, dims=(1,)),  # upside down
    "hflip": lambda x: torch.flip(x, dims=(2,)),
}


def apply_variant(image: torch.Tensor, variant: str) -> torch.Tensor:
    """``(C, H, W)`` image -> the same image rotated or flipped as ``variant`` says."""
    if variant not in ROBUSTNESS_VARIANTS:
        raise ValueError(
            f"unknown robustness variant {variant!r} (CLASSIFICATION.TEST.ROBUSTNESS_VARIANTS); "
            f"valid: {sorted(ROBUSTNESS_VARIANTS)}"
        )
    return ROBUSTNESS_VARIANTS[variant](image).contiguous()


class VariantLoader:
    """Iterates ``loader`` (batches = ``list[dict]``) with each ``"image"`` transformed."""

    def __init__(self, loader: Iterable[List[dict]], variant: str):
        apply_variant(torch.zeros(1, 2, 2), variant)  # validate the name now
        self.loader, self.variant = loader, variant

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield [dict(d, image=apply_variant(d["image"], self.variant)) for d in batch]


class ClassificationEvaluator(DatasetEvaluator):
    """Top-k accuracy (percent) of a classifier's ``"logits"`` against the inputs' ``"label"``.

    Results: ``{"classification": {"top1": %, "top5": %, "mean_class_top1": %, "num_images": n}}``
    (``top{k}`` for each ``k`` in ``topk``; ``k`` larger than the number of classes counts every
    image as correct, as for any top-k metric).
    """

    def __init__(
        self,
        dataset_name: str = "",
        topk: Sequence[int] = (1, 5),
        distributed: bool = True,
        num_classes: int = 0,
    ):
        """
        Args:
            dataset_name: used in log messages only.
            topk: the ``k`` of the reported top-k accuracies.
            distributed: gather the counts of all processes (use False when each process
                evaluates on its own, e.g. in tests).
            num_classes: for the per-class accuracy; 0 = infer from the logits.
        """
        if not topk or any(int(k) < 1 for k in topk):
            raise ValueError(f"topk must be positive integers, got {list(topk)}")
        self.dataset_name = dataset_name
        self.topk = tuple(int(k) for k in topk)
        self.distributed = distributed
        self.num_classes = num_classes
        self.reset()

    def reset(self):
        self._correct = {k: 0 for k in self.topk}
        self._count = 0
        self._image_ids: List[int] = []
        self._class_total = np.zeros(self.num_classes, dtype=np.int64)
        self._class_correct = np.zeros(self.num_classes, dtype=np.int64)

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        if len(inputs) != len(outputs):
            raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        if not inputs:
            return
        logits = torch.stack([o["logits"] for o in outputs]).float().cpu()
        labels = torch.as_tensor([int(x["label"]) for x in inputs], dtype=torch.long)
        num_classes = logits.shape[1]
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"label outside [0, {num_classes}) in {self.dataset_name or 'the dataset'}: "
                "the model has fewer classes than the dataset (CLASSIFICATION.NUM_CLASSES)"
            )
        top = logits.topk(min(max(self.topk), num_classes), dim=1).indices
        hits = top == labels[:, None]
        for k in self.topk:
            self._correct[k] += int(hits[:, :k].any(dim=1).sum())
        self._count += len(inputs)
        self._image_ids.extend(int(x["image_id"]) for x in inputs if "image_id" in x)
        if len(self._class_total) < num_classes:
            pad = num_classes - len(self._class_total)
            self._class_total = np.pad(self._class_total, (0, pad))
            self._class_correct = np.pad(self._class_correct, (0, pad))
        np.add.at(self._class_total, labels.numpy(), 1)
        np.add.at(self._class_correct, labels.numpy(), hits[:, 0].numpy().astype(np.int64))

    def _state(self) -> dict:
        return {
            "correct": self._correct,
            "count": self._count,
            "image_ids": self._image_ids,
            "class_total": self._class_total,
            "class_correct": self._class_correct,
        }

    def evaluate(self):
        states = [self._state()]
        if self.distributed:
            comm.synchronize()
            states = comm.gather(states[0], dst=0)
            if not comm.is_main_process():
                return {}
        count = sum(s["count"] for s in states)
        if count == 0:
            logger.warning(f"[ClassificationEvaluator] no images in {self.dataset_name!r}")
            return {}
        ids = list(itertools.chain.from_iterable(s["image_ids"] for s in states))
        if len(ids) != len(set(ids)):
            raise RuntimeError(
                f"evaluation of {self.dataset_name!r} saw some images more than once: the test "
                "loader must give each image to exactly one process (use InferenceSampler)"
            )
        size = max(len(s["class_total"]) for s in states)
        class_total = sum(
            np.pad(s["class_total"], (0, size - len(s["class_total"]))) for s in states
        )
        class_correct = sum(
            np.pad(s["class_correct"], (0, size - len(s["class_correct"]))) for s in states
        )
        results = OrderedDict()
        for k in self.topk:
            results[f"top{k}"] = 100.0 * sum(s["correct"][k] for s in states) / count
        seen = class_total > 0
        results["mean_class_top1"] = float(100.0 * np.mean(class_correct[seen] / class_total[seen]))
        results["num_images"] = count
        return OrderedDict(classification=results)
