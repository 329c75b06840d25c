"""Loading CIFAR-10 from an image folder, the original pickles, or tensorflow-datasets."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sgdjax.data._errors import DataError

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SHAPE = (32, 32, 3)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CACHE_VERSION = 1

HOW_TO_GET_DATA = (
    "give --data-dir a folder with {train,test}/<class>/*.jpg|png, the "
    "cifar-10-batches-py pickles, or a tensorflow-datasets data directory; or give no "
    "directory to download through tensorflow-datasets"
)


class Dataset(NamedTuple):
    """CIFAR-style arrays: uint8 NHWC images and int32 labels for train and test."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]


# ---------------------------------------------------------------- layouts


def _image_root(path: Path) -> Path | None:
    """The folder holding ``train/`` and ``test/`` class folders, if ``path`` has one."""
    for candidate in (path, path / "cifar10"):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    return None


def _pickle_root(path: Path) -> Path | None:
    for candidate in (path, path / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file() or (candidate / "test_batch").is_file():
            return candidate
    return None


def _tfds_root(path: Path) -> Path | None:
    return path if (path / "cifar10").is_dir() and any((path / "cifar10").iterdir()) else None


def detect_layout(path: Path) -> tuple[str, Path]:
    """Returns ``(layout, root)`` with layout one of "folder", "pickle", "tfds"."""
    for layout, finder in (("folder", _image_root), ("pickle", _pickle_root), ("tfds", _tfds_root)):
        root = finder(path)
        if root is not None:
            return layout, root
    raise DataError(f"{path}: no CIFAR-10 layout found; {HOW_TO_GET_DATA}")


# ---------------------------------------------------------------- image folders


def _decode(file: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            if image.mode != "RGB":
                raise DataError(f"{file}: image mode {image.mode}, expected RGB")
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(f"{file}: cannot decode image ({error})") from None
    if array.shape != IMAGE_SHAPE:
        raise DataError(f"{file}: image shape {array.shape}, expected {IMAGE_SHAPE}")
    return array


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir())


def _folder_files(root: Path) -> dict[str, list[tuple[Path, int]]]:
    train_classes = _class_folders(root / "train")
    test_classes = _class_folders(root / "test")
    if not train_classes:
        raise DataError(f"{root / 'train'}: no class folders; {HOW_TO_GET_DATA}")
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(
            f"{root}: class folders differ between train and test "
            f"(only in train: {only_train}, only in test: {only_test})"
        )
    files = {}
    for split in ("train", "test"):
        entries = []
        for label, name in enumerate(train_classes):
            for file in sorted((root / split / name).iterdir()):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    entries.append((file, label))
        if not entries:
            raise DataError(f"{root / split}: no .jpg or .png images; {HOW_TO_GET_DATA}")
        files[split] = entries
    return files


def _load_folder(root: Path) -> Dataset:
    files = _folder_files(root)
    arrays = {}
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        for split, entries in files.items():
            images = list(pool.map(_decode, [file for file, _ in entries], chunksize=256))
            arrays[split] = (
                np.stack(images),
                np.asarray([label for _, label in entries], np.int32),
            )
    return Dataset(*arrays["train"], *arrays["test"], tuple(_class_folders(root / "train")))


# ---------------------------------------------------------------- pickles


def _read_pickle(file: Path) -> dict:
    if not file.is_file():
        raise DataError(f"{file}: missing CIFAR-10 pickle batch; {HOW_TO_GET_DATA}")
    with open(file, "rb") as handle:
        try:
            # The original batches were pickled by Python 2: their byte strings need "bytes".
            return _RestrictedUnpickler(handle, encoding="bytes").load()
        except Exception as error:  # noqa: BLE001 - any failure means a malformed batch
            raise DataError(f"{file}: not a CIFAR-10 pickle batch ({error})") from None


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: loading never runs foreign code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _batch_arrays(batch: dict, file: Path) -> tuple[np.ndarray, np.ndarray]:
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{file}: pickle batch lacks 'data' or 'labels'")
    data = np.asarray(data, np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != data.shape[0]:
        raise DataError(f"{file}: data of shape {data.shape}, expected (N, 3072) with N labels")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(labels, np.int32)


def _load_pickles(root: Path) -> Dataset:
    train = [
        _batch_arrays(_read_pickle(root / f"data_batch_{i}"), root / f"data_batch_{i}")
        for i in range(1, 6)
    ]
    test_images, test_labels = _batch_arrays(_read_pickle(root / "test_batch"), root / "test_batch")
    names = CIFAR10_CLASSES
    meta_file = root / "batches.meta"
    if meta_file.is_file():
        meta = _read_pickle(meta_file)
        raw = meta.get(b"label_names", meta.get("label_names"))
        if raw:
            names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in raw)
    return Dataset(
        np.concatenate([images for images, _ in train]),
        np.concatenate([labels for _, labels in train]),
        test_images,
        test_labels,
        names,
    )


# ---------------------------------------------------------------- tensorflow-datasets


def _load_tfds(data_dir: Path | None) -> Dataset:
    """Reads cifar10 through ``tfds.data_source`` (array_record files, no TensorFlow)."""
    import tensorflow_datasets as tfds

    where = str(data_dir) if data_dir is not None else "the tensorflow-datasets default directory"
    splits = {}
    try:
        for split in ("train", "test"):
            source = tfds.data_source(
                "cifar10",
                split=split,
                data_dir=None if data_dir is None else str(data_dir),
                download=data_dir is None,
            )
            examples = [source[i] for i in range(len(source))]
            splits[split] = (
                np.stack([np.asarray(e["image"], np.uint8) for e in examples]),
                np.asarray([e["label"] for e in examples], np.int32),
            )
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - tfds raises many kinds; report them in one line
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = ""
        if "tensorflow" in str(error).lower():
            hint = (
                " (tensorflow-datasets needs TensorFlow to download and prepare cifar10 "
                "or to read TFRecord files: pip install tensorflow-cpu)"
            )
        raise DataError(
            f"{where}: cannot read cifar10 through tensorflow-datasets: {message}{hint}; "
            f"{HOW_TO_GET_DATA}"
        ) from None
    if any(images.shape[1:] != IMAGE_SHAPE for images, _ in splits.values()):
        raise DataError(f"{where}: tensorflow-datasets cifar10 images are not 32x32 RGB")
    # tfds's cifar10 labels follow the original order: airplane, automobile, ..., truck.
    return Dataset(*splits["train"], *splits["test"], CIFAR10_CLASSES)


# ---------------------------------------------------------------- cache


def _fingerprint(path: Path) -> str:
    """A key that changes when files are added, removed or renamed under ``path``.

    It combines the modification time and entry count of every folder (a folder's
    time changes whenever an entry in it is added, removed or renamed) and costs one
    ``stat`` per folder, not per file. A file rewritten in place under the same name
    is not noticed: delete the cache folder after editing images by hand.
    """
    parts = [str(_CACHE_VERSION), str(path.resolve())]
    for directory, folders, files in os.walk(path):
        folders[:] = sorted(f for f in folders if f != ".sgdjax_cache")
        # The top folder's own time changes when the cache is written into it: use
        # its subfolder names instead.
        stamp = folders if directory == str(path) else os.stat(directory).st_mtime_ns
        parts.append(f"{directory}:{stamp}:{len(files)}:{len(folders)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cache_dir_for(path: Path, cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    inside = path / ".sgdjax_cache"
    if os.access(path, os.W_OK):
        return inside
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sgdjax"


_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def _read_cache(folder: Path) -> Dataset | None:
    """The cached arrays, or None when the cache is missing, partial or corrupt."""
    if not folder.is_dir():
        return None
    try:
        arrays = [np.load(folder / f"{name}.npy", allow_pickle=False) for name in _ARRAYS]
        names = tuple((folder / "class_names.txt").read_text().split("\n"))
    except (OSError, ValueError, EOFError):
        return None
    return Dataset(*arrays, names)


def _write_cache(folder: Path, data: Dataset) -> None:
    """Writes the cache atomically: a temporary folder beside it, then one rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    try:
        for name in _ARRAYS:
            with open(temporary / f"{name}.npy", "wb") as stream:
                np.save(stream, getattr(data, name), allow_pickle=False)
                stream.flush()
                os.fsync(stream.fileno())
        (temporary / "class_names.txt").write_text("\n".join(data.class_names))
        if folder.exists():
            shutil.rmtree(folder)  # a corrupt cache being replaced
        os.rename(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


# ---------------------------------------------------------------- entry point


def load_cifar10(
    data_dir: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None
) -> Dataset:
    """Loads CIFAR-10 as uint8 NHWC images and int32 labels for train and test.

    With no directory, the data come from tensorflow-datasets (downloaded on first
    use). With a directory, its layout is detected:

    - an image folder ``<dir>/{train,test}/<class>/*.jpg|png`` (or one level down
      in ``<dir>/cifar10``); sorted class folder names give the labels;
    - the original ``cifar-10-batches-py`` pickles (read without running code);
    - a tensorflow-datasets data directory holding ``cifar10/<version>/``.

    Decoded arrays are cached as ``.npy`` files (in ``<dir>/.sgdjax_cache`` when
    writable, else ``~/.cache/sgdjax``), keyed by the folders' entry counts and
    modification times, so a second load takes well under a second. The cache is written
    atomically; a corrupt cache is ignored and rewritten.

    Args:
      data_dir: where the data are, or ``None`` for tensorflow-datasets.
      cache_dir: where to keep decoded arrays (folder layouts and pickles only).

    Returns:
      A :class:`Dataset`.

    Raises:
      DataError: missing, empty or malformed data, with the path and what to do.
    """
    if data_dir is None:
        return _load_tfds(None)
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such directory; {HOW_TO_GET_DATA}")
    if not path.is_dir():
        raise DataError(f"{path}: not a directory; {HOW_TO_GET_DATA}")
    if not any(path.iterdir()):
        raise DataError(f"{path}: directory is empty; {HOW_TO_GET_DATA}")
    layout, root = detect_layout(path)
    if layout == "tfds":
        return _load_tfds(root)
    cache_file = _cache_dir_for(path, cache_dir) / f"cifar10-{layout}-{_fingerprint(root)}"
    cached = _read_cache(cache_file)
    if cached is not None:
        return cached
    data = _load_folder(root) if layout == "folder" else _load_pickles(root)
    try:
        _write_cache(cache_file, data)
    except OSError:
        pass  # a read-only location only costs the next load its speed
    return data
