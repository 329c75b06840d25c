"""CIFAR-10 loading and downloading, on-device augmentation and host-side batching."""

from sgdjax.data._augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    augment,
    normalize,
    random_crop,
    random_flip,
)
from sgdjax.data._batches import batches, epoch_order, num_batches
from sgdjax.data._cache import default_data_dir
from sgdjax.data._cifar import CIFAR10_CLASSES, FolderImages, detect_layout, load_cifar10
from sgdjax.data._dataset import Dataset
from sgdjax.data._download import fetch_file
from sgdjax.data._errors import DataError

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DataError",
    "Dataset",
    "FolderImages",
    "augment",
    "batches",
    "default_data_dir",
    "detect_layout",
    "epoch_order",
    "fetch_file",
    "load_cifar10",
    "normalize",
    "num_batches",
    "random_crop",
    "random_flip",
]
