"""``ImageClassifier``: any detectron2 backbone + global average pooling + a linear classifier.

Registered in detectron2's ``META_ARCH_REGISTRY`` so that ``MODEL.META_ARCHITECTURE:
"ImageClassifier"`` builds it through ``build_model(cfg)``, like a detector. Its backbone is
``build_backbone(cfg)``, the very module a detector uses, so its weights load into detection
backbones key for key (see :mod:`san_det.classification.checkpoint`).
"""

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.utils.events import get_event_storage
from torch import nn

from ..modeling.architecture import architecture_keys

__all__ = ["ImageClassifier"]


@META_ARCH_REGISTRY.register()
@architecture_keys()  # its backbone records the keys its weights depend on
class ImageClassifier(nn.Module):
    """Backbone -> global average pool of one feature map -> dropout -> ``Linear(C, classes)``.

    Inputs, like detectron2's meta-architectures: ``list[dict]``, each dict with

    - ``"image"``: ``(3, H, W)`` tensor in ``INPUT.FORMAT`` channel order, 0-255 (uint8 or float);
      every image of a batch has the same ``H, W`` in training;
    - ``"label"``: int class index in ``[0, num_classes)`` (needed in training only).

    Outputs: in training ``{"loss_cls": scalar}`` (cross-entropy with label smoothing); at
    inference one dict per image, ``{"logits": (num_classes,), "probs": (num_classes,)}``.

    Attributes:
        backbone: the detectron2 ``Backbone``; ``classifier``: the ``nn.Linear`` head (named so
            that no detection key, ``head.*`` included, collides with it).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        in_feature: str = "res5",
        dropout: float = 0.0,
        label_smoothing: float = 0.0,
        input_format: str = "BGR",
    ):
        """
        Args:
            backbone: a detectron2 backbone whose ``output_shape()`` includes ``in_feature``.
            num_classes: classes of the linear classifier (> 0).
            pixel_mean, pixel_std: per-channel normalisation, in ``input_format`` order.
            in_feature: name of the backbone output to pool and classify.
            dropout: dropout probability before the classifier, in [0, 1).
            label_smoothing: label smoothing of the training loss, in [0, 1).
            input_format: channel order of the input images, "RGB" or "BGR" (recorded only).
        """
        super().__init__()
        shapes = backbone.output_shape()
        if in_feature not in shapes:
            raise ValueError(
                f"CLASSIFICATION.IN_FEATURE {in_feature!r} is not an output of the backbone; "
                f"it outputs {sorted(shapes)} (set its OUT_FEATURES to include {in_feature!r})"
            )
        if num_classes <= 0:
            raise ValueError(f"CLASSIFICATION.NUM_CLASSES must be > 0, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"CLASSIFICATION.DROPOUT must be in [0, 1), got {dropout}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                f"CLASSIFICATION.LABEL_SMOOTHING must be in [0, 1), got {label_smoothing}"
            )
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(
                f"MODEL.PIXEL_MEAN and MODEL.PIXEL_STD need 3 values, got {list(pixel_mean)} "
                f"and {list(pixel_std)}"
            )
        self.backbone = backbone
        self.in_feature = in_feature
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.input_format = input_format
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(shapes[in_feature].channels, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        return {
            "backbone": build_backbone(cfg),
            "num_classes": cfg.CLASSIFICATION.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "in_feature": cfg.CLASSIFICATION.IN_FEATURE,
            "dropout": cfg.CLASSIFICATION.DROPOUT,
            "label_smoothing": cfg.CLASSIFICATION.LABEL_SMOOTHING,
            "input_format": cfg.INPUT.FORMAT,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, images: List[torch.Tensor]) -> torch.Tensor:
        """``list`` of ``(3, H, W)`` 0-255 images (same size) -> normalised ``(N, 3, H, W)``."""
        sizes = {tuple(x.shape) for x in images}
        if len(sizes) != 1:
            raise ValueError(f"images of one batch must have the same shape, got {sorted(sizes)}")
        shape = next(iter(sizes))
        if len(shape) != 3 or shape[0] != 3:
            raise ValueError(f"each image must be a (3, H, W) tensor, got shape {shape}")
        div = getattr(self.backbone, "size_divisibility", 0)
        if div and (shape[1] % div or shape[2] % div):
            raise ValueError(
                f"image size {shape[1]}x{shape[2]} is not divisible by {div}, which the backbone "
                "needs; choose CLASSIFICATION.INPUT.TRAIN_CROP_SIZE / TEST_CROP_SIZE accordingly"
            )
        x = torch.stack([img.to(self.device, non_blocking=True) for img in images]).float()
        return (x - self.pixel_mean) / self.pixel_std

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised ``(N, 3, H, W)`` -> backbone feature ``in_feature``, ``(N, C, h, w)``."""
        return self.backbone(images)[self.in_feature]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, C, h, w)`` -> logits ``(N, num_classes)``."""
        return self.classifier(self.dropout(self.pool(features).flatten(1)))

    def _labels(self, batched_inputs: List[Dict]) -> torch.Tensor:
        if any("label" not in x for x in batched_inputs):
            raise ValueError('training inputs need a "label" in every dict')
        labels = torch.as_tensor([int(x["label"]) for x in batched_inputs], dtype=torch.long)
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(
                f"label {int(bad[0])} is outside [0, {self.num_classes}) "
                "(CLASSIFICATION.NUM_CLASSES)"
            )
        return labels.to(self.device)

    def forward(self, batched_inputs: List[Dict]):
        """See the class docstring for the input and output formats."""
        if self.training:
            # Check labels before the (expensive) forward pass.
            labels = self._labels(batched_inputs)
        if not self.training:
            sizes = {tuple(x["image"].shape) for x in batched_inputs}
            if len(sizes) > 1:  # evaluation without a crop: one image at a time
                return [self.forward([x])[0] for x in batched_inputs]
        images = self.preprocess_image([x["image"] for x in batched_inputs])
        logits = self.forward_head(self.forward_features(images))
        if self.training:
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
            self._log_accuracy(logits, labels)
            return {"loss_cls": loss}
        probs = logits.float().softmax(dim=1)
        return [{"logits": lg, "probs": p} for lg, p in zip(logits, probs)]

    @staticmethod
    def _log_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> None:
        try:
            storage = get_event_storage()
        except AssertionError:  # called outside a trainer
            return
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        storage.put_scalar("cls/train_top1", float(accuracy) * 100.0)
