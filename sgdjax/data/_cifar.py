"""Loading CIFAR-10 from an image folder, the original pickles, or tensorflow-datasets."""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
import tarfile
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from sgdjax.data import _cache
from sgdjax.data._dataset import IMAGE_SHAPE, Dataset, check_dataset, check_labels
from sgdjax.data._download import fetch_file
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
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# The python version of the data set, as published on its home page.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_URL_VARIABLE = "SGDJAX_CIFAR10_URL"
_ARCHIVE = "cifar-10-python.tar.gz"
_ARCHIVE_FOLDER = "cifar-10-batches-py"
_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")

HOW_TO_GET_DATA = (
    "give --data-dir a folder with {train,test}/<class>/*.jpg|png, the "
    "cifar-10-batches-py pickles, or a tensorflow-datasets data directory; or give no "
    "--data-dir to download CIFAR-10 into $SGDJAX_DATA or the user cache folder"
)


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
            # Checked before any pixel is decoded: a huge image costs nothing.
            if image.size != IMAGE_SHAPE[1::-1]:
                width, height = image.size
                raise DataError(f"{file}: image shape {(height, width, 3)}, expected {IMAGE_SHAPE}")
            if image.mode != "RGB":
                raise DataError(f"{file}: image mode {image.mode}, expected RGB")
            array = np.asarray(image, dtype=np.uint8)
    except Image.DecompressionBombError as error:
        raise DataError(f"{file}: image far larger than 32x32 ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, DataError):
            raise
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


class FolderImages:
    """The images of an image folder as a uint8 ``(N, 32, 32, 3)`` array read on demand.

    Indexing with an integer array (or a slice) decodes only those files, so a
    process of a multi-process run reads from disk only the examples it places.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, files: Sequence[Path]):
        self.files = list(files)
        self.shape = (len(self.files), *IMAGE_SHAPE)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index) -> np.ndarray:
        chosen = np.arange(len(self.files))[index]
        if np.ndim(chosen) == 0:
            return _decode(self.files[int(chosen)])
        return _decode_all([self.files[i] for i in np.ravel(chosen)]).reshape(
            *np.shape(chosen), *IMAGE_SHAPE
        )

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        images = self[:]
        return images if dtype is None else images.astype(dtype)


def _decode_all(files: Sequence[Path]) -> np.ndarray:
    """The decoded images of ``files``, stacked (several threads)."""
    from PIL import Image

    if not files:
        return np.zeros((0, *IMAGE_SHAPE), np.uint8)
    with (
        warnings.catch_warnings(),  # sizes are checked before decoding: no bomb to warn of
        ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool,
    ):
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return np.stack(list(pool.map(_decode, files, chunksize=256)))


def _lazy_folder(root: Path) -> Dataset:
    """An image folder's labels, with :class:`FolderImages` that decode on demand."""
    files = _folder_files(root)
    arrays = []
    for split in ("train", "test"):
        entries = files[split]
        labels = np.asarray([label for _, label in entries], np.int32)
        arrays += [FolderImages([file for file, _ in entries]), labels]
    return Dataset(*arrays, tuple(_class_folders(root / "train")))


def _load_folder(root: Path) -> Dataset:
    lazy = _lazy_folder(root)
    return lazy._replace(train_images=lazy.train_images[:], test_images=lazy.test_images[:])


# ---------------------------------------------------------------- pickles


def _read_pickle(file: Path) -> object:
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


def _field(batch: object, key: str, file: Path):
    if not isinstance(batch, dict):
        raise DataError(f"{file}: pickle holds a {type(batch).__name__}, expected a dict")
    value = batch.get(key.encode(), batch.get(key))
    if value is None:
        raise DataError(f"{file}: pickle batch lacks {key!r}")
    return value


def _integers(value: object, what: str, file: Path) -> np.ndarray:
    """``value`` as a numpy integer array, or a one-line :class:`DataError`."""
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise DataError(f"{file}: {what} is a {type(value).__name__}, expected an array or list")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:
        raise DataError(f"{file}: {what} is not a rectangular array ({error})") from None
    if array.size == 0:
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu":
        raise DataError(f"{file}: {what} of dtype {array.dtype}, expected integers")
    return array


def _batch_arrays(batch: object, file: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    data = _integers(_field(batch, "data", file), "data", file)
    labels = _integers(_field(batch, "labels", file), "labels", file)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{file}: data of shape {data.shape}, expected (N, 3072)")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise DataError(f"{file}: pixel values {data.min()}..{data.max()}, expected 0..255")
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"{file}: labels of shape {labels.shape} for {len(data)} images")
    check_labels(labels, num_classes, str(file))
    images = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def _label_names(meta_file: Path) -> tuple[str, ...]:
    """The class names in ``batches.meta`` (CIFAR-10's own when it is absent)."""
    if not meta_file.is_file():
        return CIFAR10_CLASSES
    meta = _read_pickle(meta_file)
    if not isinstance(meta, dict):
        raise DataError(f"{meta_file}: pickle holds a {type(meta).__name__}, expected a dict")
    raw = meta.get(b"label_names", meta.get("label_names"))
    if raw is None:
        return CIFAR10_CLASSES
    if not isinstance(raw, (list, tuple)) or not all(isinstance(n, (str, bytes)) for n in raw):
        raise DataError(f"{meta_file}: label_names must be a list of strings, got {raw!r:.80}")
    if len(raw) != len(CIFAR10_CLASSES):
        raise DataError(
            f"{meta_file}: {len(raw)} label names, expected {len(CIFAR10_CLASSES)} for CIFAR-10"
        )
    try:
        return tuple(n.decode("utf-8") if isinstance(n, bytes) else n for n in raw)
    except UnicodeDecodeError as error:
        raise DataError(f"{meta_file}: label names are not UTF-8 ({error})") from None


def _load_pickles(root: Path) -> Dataset:
    names = _label_names(root / "batches.meta")
    train = [
        _batch_arrays(_read_pickle(root / f"data_batch_{i}"), root / f"data_batch_{i}", len(names))
        for i in range(1, 6)
    ]
    test_file = root / "test_batch"
    test_images, test_labels = _batch_arrays(_read_pickle(test_file), test_file, len(names))
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


# ---------------------------------------------------------------- download


def _tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _archive_urls(urls: str | Sequence[str] | None) -> list[str]:
    """``urls``, else the mirrors in ``$SGDJAX_CIFAR10_URL``, else the home page."""
    if urls is not None:
        return [urls] if isinstance(urls, str) else list(urls)
    listed = os.environ.get(CIFAR10_URL_VARIABLE, "").replace(",", " ").split()
    return listed or [CIFAR10_URL]


def _unpacked(root: Path) -> bool:
    return all((root / _ARCHIVE_FOLDER / name).is_file() for name in _BATCHES)


def _download(root: Path, urls: list[str], progress: bool) -> Path:
    """Fetches and unpacks the archive into ``root/cifar-10-batches-py`` (once, atomically)."""
    target = root / _ARCHIVE_FOLDER
    if _unpacked(root):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"{root}: cannot create the download folder ({error})") from None
    _cache.remove_stale_temporaries(root)
    try:
        archive = fetch_file(urls, root / _ARCHIVE, md5=CIFAR10_MD5, progress=progress)
    except DataError as error:
        raise DataError(
            f"{error}; downloading CIFAR-10 needs a network connection (or a reachable mirror "
            f"in ${CIFAR10_URL_VARIABLE}); without one, give --data-dir a local copy (the "
            "cifar-10-batches-py pickles or {train,test}/<class>/ images)"
        ) from None
    if _unpacked(root):  # another process unpacked it meanwhile
        return target
    wanted = {f"{_ARCHIVE_FOLDER}/{name}" for name in _BATCHES}
    temporary = _cache.make_temporary(root, _ARCHIVE_FOLDER)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name in wanted]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(temporary, members=members, **safe)
        absent = sorted(wanted - {m.name for m in members})
        if absent:
            raise DataError(f"{archive}: the archive lacks {absent}")
        try:
            os.rename(temporary / _ARCHIVE_FOLDER, target)
        except OSError as error:
            if not _unpacked(root):
                raise DataError(
                    f"{target}: cannot put the unpacked batches there ({error}); remove "
                    "the folder if it holds an incomplete copy"
                ) from None
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(f"{archive}: cannot unpack ({error})") from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    archive.unlink(missing_ok=True)  # the unpacked batches now mark the download as done
    return target


# ---------------------------------------------------------------- entry point


def load_cifar10(
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool | None = None,
    urls: str | Sequence[str] | None = None,
    progress: bool = True,
    lazy: bool = False,
) -> Dataset:
    """Loads CIFAR-10 as uint8 NHWC images and int32 labels for train and test.

    With no directory, the original python-version archive is downloaded once from
    the data set's home page (or the mirrors in ``urls`` or ``$SGDJAX_CIFAR10_URL``),
    checked against its published md5, resumed if interrupted, and unpacked
    atomically into ``$SGDJAX_DATA/cifar-10-batches-py`` (default
    ``~/.cache/sgdjax``); later calls read the unpacked batches. When TensorFlow is
    installed and nothing has been downloaded yet, tensorflow-datasets provides the
    data instead (``download=True`` insists on the archive). With a directory, its
    layout is detected:

    - an image folder ``<dir>/{train,test}/<class>/*.jpg|png`` (or one level down
      in ``<dir>/cifar10``); sorted class folder names give the labels;
    - the original ``cifar-10-batches-py`` pickles (read without running code);
    - a tensorflow-datasets data directory holding ``cifar10/<version>/``.

    Every source is checked: image sizes before decoding, array shapes and dtypes,
    labels below the class count, ten names in ``batches.meta``.

    Decoded arrays are cached as ``.npy`` files (in ``<dir>/.sgdjax_cache`` when
    writable, else ``$SGDJAX_DATA`` or ``~/.cache/sgdjax``), keyed by the folders'
    entry counts and modification times, so a second load takes well under a second.
    The cache is written atomically; a cache that is unreadable or inconsistent
    (lengths, shapes, dtypes, labels) is rebuilt with a warning; temporary folders
    left by a killed writer are removed.

    Args:
      data_dir: where the data are, or ``None`` to download (see above).
      cache_dir: where to keep decoded arrays (folder layouts and pickles only).
      download: ``None``: download only when ``data_dir`` is ``None``; ``True``: also
        download into ``data_dir`` when it holds no CIFAR-10 layout, and prefer the
        archive to tensorflow-datasets; ``False``: never use the network.
      urls: mirrors of ``cifar-10-python.tar.gz`` tried in order, replacing
        ``$SGDJAX_CIFAR10_URL`` (whitespace- or comma-separated) and the home page.
      progress: show a progress bar while downloading.
      lazy: read images only when indexed (each process of a multi-process run reads
        only the rows it places): the cache's images memory-mapped, else an image
        folder's files decoded on demand (:class:`FolderImages`; no cache is
        written). Pickles and tensorflow-datasets are read whole.

    Returns:
      A :class:`Dataset`.

    Raises:
      DataError: missing, empty or malformed data, or a failed download, in one line
        with the path and what to do.

    Example::

      data = load_cifar10()  # the first call downloads 163 MiB
      data.train_images.shape  # (50000, 32, 32, 3)
    """
    if download not in (None, True, False):
        raise ValueError(f"download must be None, True or False, got {download!r}")
    if data_dir is None:
        root = _cache.default_data_dir()
        if not _unpacked(root):
            if download is None and _tensorflow_installed():
                return _checked(_load_tfds(None), "tensorflow-datasets cifar10")
            if download is False:
                raise DataError(
                    f"{root}: CIFAR-10 is not downloaded there and download=False; "
                    f"{HOW_TO_GET_DATA}"
                )
        path = _download(root, _archive_urls(urls), progress)
    else:
        path = Path(data_dir).expanduser()
        if download and not (path.is_dir() and _has_layout(path)):
            if path.exists() and not path.is_dir():
                raise DataError(f"{path}: not a directory; {HOW_TO_GET_DATA}")
            path = _download(path, _archive_urls(urls), progress)
    if not path.exists():
        raise DataError(f"{path}: no such directory; {HOW_TO_GET_DATA}")
    if not path.is_dir():
        raise DataError(f"{path}: not a directory; {HOW_TO_GET_DATA}")
    if not any(path.iterdir()):
        raise DataError(f"{path}: directory is empty; {HOW_TO_GET_DATA}")
    layout, root = detect_layout(path)
    if layout == "tfds":
        return _checked(_load_tfds(root), str(root))
    cache_parent = _cache.cache_dir_for(path, cache_dir)
    _cache.remove_stale_temporaries(cache_parent)
    cache_file = cache_parent / f"cifar10-{layout}-{_cache.fingerprint(root)}"
    cached, problem = _cache.read_cache(cache_file, lazy=lazy)
    if cached is not None:
        return cached
    if lazy and layout == "folder":
        return _checked(_lazy_folder(root), str(root))
    if problem is not None:
        warnings.warn(f"{cache_file}: cache {problem}; rebuilding it", stacklevel=2)
    data = _checked(_load_folder(root) if layout == "folder" else _load_pickles(root), str(root))
    try:
        _cache.write_cache(cache_file, data)
    except OSError:
        pass  # a read-only location only costs the next load its speed
    return data


def _has_layout(path: Path) -> bool:
    try:
        detect_layout(path)
    except DataError:
        return False
    return True


def _checked(data: Dataset, where: str) -> Dataset:
    check_dataset(data, where)
    return data
