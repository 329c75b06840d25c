"""sgdjax/data/_cifar.py: the loaders on generated folders, pickles (Python 2's too) and
tfds (mocked), and each kind of bad input named in one line."""

import io
import os
import pickle
import struct

import numpy as np
import pytest
from helpers import SMALL_FOLDER, write_image_folder
from PIL import Image

from sgdjax import data


class Python2Pickler(pickle._Pickler):
    """Writes every str and bytes object as Python 2 wrote its ``str``: (SHORT_)BINSTRING.

    The original CIFAR-10 batches were written by Python 2's cPickle this way (keys,
    dtype codes and the array's raw data alike); Python 3 reads such strings only
    with ``encoding="bytes"`` (or latin-1).
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_python2_str(self, obj):
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = _save_python2_str
    dispatch[bytes] = _save_python2_str


def python2_dump(obj, handle):
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(obj)
    # numpy of the Python 2 era lived in numpy.core.
    handle.write(buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def make_pickles(root, per_batch=6, seed=0, dump=pickle.dump):
    rng = np.random.default_rng(seed)
    expected = {"train": ([], []), "test": ([], [])}
    names = [f"batch_{i}" for i in range(1, 6)] + ["test"]
    for name in names:
        data_rows = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        file = root / ("test_batch" if name == "test" else "data_" + name)
        with open(file, "wb") as handle:
            dump({b"data": data_rows, b"labels": labels}, handle)
        split = "test" if name == "test" else "train"
        expected[split][0].append(data_rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        expected[split][1].append(np.asarray(labels, np.int32))
    with open(root / "batches.meta", "wb") as handle:
        dump({b"label_names": [n.encode() for n in data.CIFAR10_CLASSES]}, handle)
    return {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in expected.items()}


# ---------------------------------------------------------------- loaders


def test_image_folder(tmp_path):
    expected = write_image_folder(tmp_path / "cifar", **SMALL_FOLDER)
    loaded = data.load_cifar10(tmp_path / "cifar")
    assert loaded.class_names == ("airplane", "cat", "dog")
    for split in ("train", "test"):
        images, labels = getattr(loaded, f"{split}_images"), getattr(loaded, f"{split}_labels")
        assert images.dtype == np.uint8 and images.shape == expected[split][0].shape
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(images, expected[split][0])  # PNG is lossless
        np.testing.assert_array_equal(labels, expected[split][1])


def test_image_folder_one_level_down_and_jpeg(tmp_path):
    folder = tmp_path / "cifar10" / "train" / "a"
    folder.mkdir(parents=True)
    (tmp_path / "cifar10" / "test" / "a").mkdir(parents=True)
    pixels = np.full((32, 32, 3), 128, np.uint8)
    Image.fromarray(pixels).save(folder / "x.jpg", quality=95)
    Image.fromarray(pixels).save(tmp_path / "cifar10" / "test" / "a" / "y.JPEG", quality=95)
    loaded = data.load_cifar10(tmp_path)
    assert loaded.train_images.shape == (1, 32, 32, 3) and loaded.test_images.shape == (
        1,
        32,
        32,
        3,
    )
    assert np.abs(loaded.train_images.astype(int) - 128).max() <= 2


def test_pickle_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    expected = make_pickles(root)
    for where in (root, tmp_path):  # the folder itself or its parent
        loaded = data.load_cifar10(where, cache_dir=tmp_path / f"cache-{where.name}")
        np.testing.assert_array_equal(loaded.train_images, expected["train"][0])
        np.testing.assert_array_equal(loaded.train_labels, expected["train"][1])
        np.testing.assert_array_equal(loaded.test_images, expected["test"][0])
        np.testing.assert_array_equal(loaded.test_labels, expected["test"][1])
        assert loaded.class_names == data.CIFAR10_CLASSES


def test_pickles_written_by_python2(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    expected = make_pickles(root, dump=python2_dump)
    raw = (root / "data_batch_1").read_bytes()
    assert b"numpy.core.multiarray" in raw and b"_codecs" not in raw
    with pytest.raises(UnicodeDecodeError):  # what a plain pickle.load does with them
        pickle.loads(raw)
    loaded = data.load_cifar10(root, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(loaded.train_images, expected["train"][0])
    np.testing.assert_array_equal(loaded.test_labels, expected["test"][1])
    assert loaded.class_names == data.CIFAR10_CLASSES


def test_pickles_never_run_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    make_pickles(root)
    with open(root / "test_batch", "wb") as handle:
        pickle.dump({b"data": Payload(), b"labels": []}, handle)
    with pytest.raises(data.DataError, match="test_batch"):
        data.load_cifar10(root, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "pwned").exists()


def test_tfds_path_with_mock_data(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    from sgdjax.data import _cifar

    # With TensorFlow installed and nothing downloaded, tensorflow-datasets is the source.
    monkeypatch.setattr(_cifar, "_tensorflow_installed", lambda: True)
    monkeypatch.setenv("SGDJAX_DATA", str(tmp_path))
    with tfds.testing.mock_data(num_examples=6):
        loaded = data.load_cifar10()
    assert loaded.train_images.shape == (6, 32, 32, 3) and loaded.train_images.dtype == np.uint8
    assert loaded.test_images.shape == (6, 32, 32, 3)
    assert loaded.train_labels.dtype == np.int32
    assert set(loaded.train_labels.tolist()) <= set(range(10))
    assert loaded.class_names == data.CIFAR10_CLASSES


# ---------------------------------------------------------------- bad input


def test_missing_directory(tmp_path):
    with pytest.raises(data.DataError, match=f"{tmp_path / 'nope'}: no such directory"):
        data.load_cifar10(tmp_path / "nope")


def test_empty_directory(tmp_path):
    with pytest.raises(data.DataError, match="is empty"):
        data.load_cifar10(tmp_path)


def test_unknown_layout(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(data.DataError, match="no CIFAR-10 layout"):
        data.load_cifar10(tmp_path)


def test_corrupt_image_is_named(tmp_path):
    write_image_folder(tmp_path, **SMALL_FOLDER)
    bad = tmp_path / "train" / "dog" / "0001.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(data.DataError, match="0001.png: cannot decode"):
        data.load_cifar10(tmp_path)


def test_wrong_size_and_mode_are_named(tmp_path):
    write_image_folder(tmp_path, **SMALL_FOLDER)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "train/cat/small.png")
    with pytest.raises(data.DataError, match=r"small.png: image shape \(16, 16, 3\)"):
        data.load_cifar10(tmp_path)
    (tmp_path / "train/cat/small.png").unlink()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "train/cat/gray.png")
    with pytest.raises(data.DataError, match="gray.png: image mode L"):
        data.load_cifar10(tmp_path)


def test_class_folders_differ(tmp_path):
    write_image_folder(tmp_path, **SMALL_FOLDER)
    (tmp_path / "test" / "dog").rename(tmp_path / "test" / "horse")
    with pytest.raises(
        data.DataError, match=r"only in train: \['dog'\], only in test: \['horse'\]"
    ):
        data.load_cifar10(tmp_path)


def test_missing_pickle_batch(tmp_path):
    make_pickles(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(data.DataError, match="data_batch_3: missing"):
        data.load_cifar10(tmp_path)


def test_unreadable_tfds_directory(tmp_path):
    (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)
    with pytest.raises(data.DataError, match="tensorflow-datasets"):
        data.load_cifar10(tmp_path)


def test_decompression_bomb_is_one_line(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    write_image_folder(tmp_path, **SMALL_FOLDER)
    # Pillow refuses images over twice MAX_IMAGE_PIXELS; lowered, a 64x64 image trips it.
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1500)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "train/cat/bomb.png")
    with pytest.raises(data.DataError, match="bomb.png: image far larger than 32x32") as raised:
        data.load_cifar10(tmp_path)
    assert "\n" not in str(raised.value)


def test_large_image_is_refused_before_decoding(tmp_path, monkeypatch):
    write_image_folder(tmp_path, **SMALL_FOLDER)
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(tmp_path / "test/dog/big.png")
    monkeypatch.setattr(np, "asarray", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(data.DataError, match=r"big.png: image shape \(40, 48, 3\)"):
        data._cifar._decode(tmp_path / "test/dog/big.png")


def _rewrite(file, obj):
    with open(file, "wb") as handle:
        pickle.dump(obj, handle)


ROWS = np.zeros((6, 3072), np.uint8)


@pytest.mark.parametrize(
    "file, obj, message",
    [
        ("data_batch_2", [ROWS, [0] * 6], "data_batch_2: pickle holds a list, expected a dict"),
        ("test_batch", {b"data": ROWS, b"labels": 7}, "labels is a int, expected an array"),
        ("data_batch_1", {b"data": ROWS, b"labels": [0.5] * 6}, "labels of dtype float64"),
        ("data_batch_1", {b"data": ROWS, b"labels": [0] * 5}, r"labels of shape \(5,\) for 6"),
        ("data_batch_1", {b"data": "pixels", b"labels": [0] * 6}, "data is a str"),
        ("data_batch_1", {b"labels": [0] * 6}, "lacks 'data'"),
        ("data_batch_3", {b"data": ROWS[:, :100], b"labels": [0] * 6}, r"\(6, 100\)"),
        ("batches.meta", {b"label_names": 7}, "label_names must be a list of strings, got 7"),
        ("batches.meta", {b"label_names": list(range(10))}, "label_names must be a list of str"),
        ("batches.meta", "names", "batches.meta: pickle holds a str"),
    ],
    ids=["list", "int_labels", "float_labels", "short_labels", "str_data", "no_data", "width",
         "int_names", "int_name_list", "str_meta"],
)  # fmt: skip
def test_malformed_pickles_are_one_line(tmp_path, file, obj, message):
    make_pickles(tmp_path)
    _rewrite(tmp_path / file, obj)
    with pytest.raises(data.DataError, match=message) as raised:
        data.load_cifar10(tmp_path, cache_dir=tmp_path / "cache")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("bad", [255, -1, 10])
def test_pickle_labels_are_checked_against_the_class_count(tmp_path, bad):
    make_pickles(tmp_path)
    _rewrite(tmp_path / "data_batch_4", {b"data": ROWS, b"labels": [0, 1, bad, 3, 4, 5]})
    with pytest.raises(data.DataError, match=f"data_batch_4: label {bad} outside 0..9"):
        data.load_cifar10(tmp_path, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("count", [9, 11])
def test_meta_with_the_wrong_number_of_names(tmp_path, count):
    make_pickles(tmp_path)
    _rewrite(tmp_path / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(count)]})
    with pytest.raises(data.DataError, match=f"batches.meta: {count} label names, expected 10"):
        data.load_cifar10(tmp_path, cache_dir=tmp_path / "cache")


def test_tfds_labels_are_checked(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)
    image = np.zeros((32, 32, 3), np.uint8)
    examples = [{"image": image, "label": label} for label in (0, 9, 12)]
    monkeypatch.setattr(tfds, "data_source", lambda *args, **kwargs: examples)
    with pytest.raises(data.DataError, match=r"label 12 outside 0..9"):
        data.load_cifar10(tmp_path)
