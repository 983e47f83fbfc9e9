"""Image transforms of ImageNet training and evaluation, on PIL images, producing uint8 tensors.

Training: ``RandomResizedCrop(TRAIN_CROP_SIZE, scale, ratio)`` then a horizontal flip with
probability 0.5. Evaluation: resize the shorter side to ``TEST_RESIZE`` then a centre crop of
``TEST_CROP_SIZE``. Images leave as ``(3, H, W)`` uint8 tensors in ``INPUT.FORMAT`` channel order;
the model normalises them (``MODEL.PIXEL_MEAN/STD``), as detectron2's meta-architectures do.
Randomness comes from torch's generator, which detectron2 seeds per data-loader worker.
"""

from typing import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop

__all__ = [
    "ClassificationTransform",
    "build_classification_transform",
    "pil_to_tensor",
    "INTERPOLATIONS",
]

INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def pil_to_tensor(image: Image.Image, input_format: str = "RGB") -> torch.Tensor:
    """RGB PIL image -> ``(3, H, W)`` uint8 tensor in ``input_format`` ("RGB" or "BGR") order."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got array shape {array.shape}")
    if input_format == "BGR":
        array = array[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class ClassificationTransform:
    """Callable ``PIL RGB image -> (3, H, W) uint8 tensor``; see the module docstring."""

    def __init__(
        self,
        is_train: bool,
        *,
        train_crop_size: int = 224,
        train_crop_scale: Sequence[float] = (0.08, 1.0),
        train_crop_ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        random_flip: bool = True,
        test_resize: int = 256,
        test_crop_size: int = 224,
        interpolation: str = "bilinear",
        input_format: str = "RGB",
    ):
        for name, value in [
            ("TRAIN_CROP_SIZE", train_crop_size),
            ("TEST_RESIZE", test_resize),
            ("TEST_CROP_SIZE", test_crop_size),
        ]:
            if int(value) <= 0:
                raise ValueError(f"CLASSIFICATION.INPUT.{name} must be > 0, got {value}")
        if test_crop_size > test_resize:
            raise ValueError(
                f"CLASSIFICATION.INPUT.TEST_CROP_SIZE ({test_crop_size}) must not exceed "
                f"TEST_RESIZE ({test_resize})"
            )
        scale, ratio = tuple(train_crop_scale), tuple(train_crop_ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(
                f"CLASSIFICATION.INPUT.TRAIN_CROP_SCALE must be (lo, hi) with 0 < lo <= hi <= 1, "
                f"got {scale}"
            )
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(
                f"CLASSIFICATION.INPUT.TRAIN_CROP_RATIO must be (lo, hi) with 0 < lo <= hi, "
                f"got {ratio}"
            )
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"CLASSIFICATION.INPUT.INTERPOLATION must be one of {sorted(INTERPOLATIONS)}, "
                f"got {interpolation!r}"
            )
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f'INPUT.FORMAT must be "RGB" or "BGR", got {input_format!r}')
        self.is_train = is_train
        self.train_crop_size = int(train_crop_size)
        self.scale, self.ratio = scale, ratio
        self.random_flip = random_flip
        self.test_resize = int(test_resize)
        self.test_crop_size = int(test_crop_size)
        self.interpolation = INTERPOLATIONS[interpolation]
        self.input_format = input_format

    def __call__(self, image: Image.Image) -> torch.Tensor:
        size = self.train_crop_size
        if self.is_train:
            top, left, h, w = RandomResizedCrop.get_params(image, self.scale, self.ratio)
            image = TF.resized_crop(
                image, top, left, h, w, [size, size], self.interpolation, antialias=True
            )
            if self.random_flip and torch.rand(()) < 0.5:
                image = TF.hflip(image)
        else:
            image = TF.resize(image, self.test_resize, self.interpolation, antialias=True)
            image = TF.center_crop(image, [self.test_crop_size, self.test_crop_size])
        return pil_to_tensor(image, self.input_format)

    def __repr__(self) -> str:
        if self.is_train:
            return (
                f"ClassificationTransform(train: RandomResizedCrop({self.train_crop_size}, "
                f"scale={self.scale}, ratio={self.ratio}), flip={self.random_flip})"
            )
        return (
            f"ClassificationTransform(test: Resize({self.test_resize}), "
            f"CenterCrop({self.test_crop_size}))"
        )


def build_classification_transform(cfg, is_train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """The training or evaluation transform described by ``cfg.CLASSIFICATION.INPUT``."""
    c = cfg.CLASSIFICATION.INPUT
    return ClassificationTransform(
        is_train,
        train_crop_size=c.TRAIN_CROP_SIZE,
        train_crop_scale=c.TRAIN_CROP_SCALE,
        train_crop_ratio=c.TRAIN_CROP_RATIO,
        random_flip=c.RANDOM_FLIP,
        test_resize=c.TEST_RESIZE,
        test_crop_size=c.TEST_CROP_SIZE,
        interpolation=c.INTERPOLATION,
        input_format=cfg.INPUT.FORMAT,
    )
