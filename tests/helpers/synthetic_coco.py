"""A generated COCO ground truth with a detector-like result set, for testing and timing evaluators.

:func:`synthetic_coco_detections` needs no images: each ground-truth box (small, medium and large,
some crowd) is found by a few jittered detections whose scores fall with the jitter, some with the
wrong class, plus false positives, up to ``detections_per_image`` per image; so AP lands between 0
and 1 and every branch of COCO's matching (crowd, area ranges, max detections) is taken.
:func:`process_coco_results` feeds such results to a detectron2 evaluator as a model's outputs.
"""

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

__all__ = ["process_coco_results", "synthetic_coco_detections"]


def _boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    """(n, 4) XYWH boxes inside the image, sides log-uniform in [4, 300] px."""
    wh = np.exp(rng.uniform(np.log(4), np.log(300), size=(n, 2)))
    wh = np.minimum(wh, [width - 1, height - 1])
    xy = rng.uniform(0, 1, size=(n, 2)) * ([width, height] - wh)
    return np.concatenate([xy, wh], axis=1)


def synthetic_coco_detections(
    num_images: int,
    detections_per_image: int = 100,
    category_ids: Sequence[int] = (1, 3, 7, 10, 12),
    seed: int = 0,
) -> Tuple[Dict, List[Dict]]:
    """A COCO ground-truth dict and a COCO results list (``image_id, category_id, bbox, score``).

    Args:
        num_images: images of 640x480, each with 0 to 12 ground-truth boxes (ids from 1).
        detections_per_image: exact number of detections of every image.
        category_ids: the dataset's category ids (non-contiguous by default).
        seed: the whole set is a function of the arguments.
    """
    rng = np.random.default_rng(seed)
    cats = np.asarray(category_ids)
    width, height = 640, 480
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        images.append(
            {"id": image_id, "width": width, "height": height, "file_name": f"{image_id:06d}.jpg"}
        )
        n_gt = int(rng.integers(0, 13))
        gt = _boxes(rng, n_gt, width, height)
        gt_cats = rng.choice(cats, size=n_gt)
        crowd = rng.random(n_gt) < 0.03
        for box, cat, is_crowd in zip(gt, gt_cats, crowd):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cat),
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": int(is_crowd),
                }
            )
        # Hits: up to 4 jittered copies of each box; then false positives fill the image's budget.
        copies = rng.integers(0, 5, size=n_gt)
        hit_boxes = np.repeat(gt, copies, axis=0)[:detections_per_image]
        hit_cats = np.repeat(gt_cats, copies)[: len(hit_boxes)]
        jitter = rng.exponential(0.12, size=(len(hit_boxes), 1))
        noise = rng.normal(0, 1, size=(len(hit_boxes), 4)) * jitter
        hit_boxes = hit_boxes + noise * np.repeat(hit_boxes[:, 2:], 2, axis=1)
        hit_boxes[:, 2:] = np.maximum(hit_boxes[:, 2:], 1.0)
        hit_scores = np.clip(1.0 - 2.5 * jitter[:, 0] + rng.normal(0, 0.1, len(hit_boxes)), 0, 1)
        wrong = rng.random(len(hit_boxes)) < 0.1
        hit_cats = np.where(wrong, rng.choice(cats, size=len(hit_boxes)), hit_cats)
        n_fp = detections_per_image - len(hit_boxes)
        boxes = np.concatenate([hit_boxes, _boxes(rng, n_fp, width, height)])
        scores = np.concatenate([hit_scores, rng.beta(1.2, 6.0, size=n_fp)])
        det_cats = np.concatenate([hit_cats, rng.choice(cats, size=n_fp)])
        for box, cat, score in zip(boxes, det_cats, scores):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(cat),
                    "bbox": [float(v) for v in box],
                    "score": float(score),
                }
            )
    ground_truth = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": int(c), "name": f"class_{c}"} for c in cats],
    }
    return ground_truth, results


def process_coco_results(
    evaluator: DatasetEvaluator, dataset_name: str, results: List[Dict], image_size=(480, 640)
) -> None:
    """``evaluator.process`` each image's detections of ``results`` (COCO format, dataset category
    ids) as the ``Instances`` a detector would output; ``image_size`` is ``(height, width)``."""
    mapping = MetadataCatalog.get(dataset_name).thing_dataset_id_to_contiguous_id
    by_image: Dict[int, List[Dict]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    for image_id, rows in by_image.items():
        instances = Instances(image_size)
        boxes = torch.tensor([r["bbox"] for r in rows], dtype=torch.float32)
        instances.pred_boxes = Boxes(BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
        instances.scores = torch.tensor([r["score"] for r in rows])
        instances.pred_classes = torch.tensor([mapping[r["category_id"]] for r in rows])
        evaluator.process([{"image_id": image_id}], [{"instances": instances}])
