"""The arrays a CIFAR-style loader returns, and the checks every source passes."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sgdjax.data._errors import DataError

IMAGE_SHAPE = (32, 32, 3)


class Dataset(NamedTuple):
    """CIFAR-style arrays: uint8 NHWC images and int32 labels for train and test."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raises :class:`DataError` naming ``where`` unless every label is in ``[0, num_classes)``."""
    if labels.size == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise DataError(
            f"{where}: label {bad} outside 0..{num_classes - 1} ({num_classes} classes)"
        )


def check_dataset(data: Dataset, where: str) -> None:
    """Raises :class:`DataError` unless ``data`` has CIFAR shapes, dtypes and labels."""
    names = data.class_names
    if not names or not all(isinstance(name, str) and name for name in names):
        raise DataError(f"{where}: class names {names!r} are not non-empty strings")
    for split in ("train", "test"):
        images = getattr(data, f"{split}_images")
        labels = getattr(data, f"{split}_labels")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
            raise DataError(
                f"{where}: {split} images of shape {images.shape} and dtype {images.dtype}, "
                f"expected (N, 32, 32, 3) uint8"
            )
        if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
            raise DataError(
                f"{where}: {split} labels of shape {labels.shape} and dtype {labels.dtype} "
                f"for {len(images)} images, expected ({len(images)},) int32"
            )
        check_labels(labels, len(names), f"{where} ({split})")
