"""The data layer: loaders on generated folders and pickles, tfds (mocked), cache, augmentation."""

import io
import os
import pickle
import struct
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import write_image_folder
from PIL import Image

from sgdjax import data
from sgdjax.data import _cache

CLASSES = ("cat", "airplane", "dog")  # sorted: airplane=0, cat=1, dog=2
# Three classes, 4 training and 2 test images each.
SMALL_FOLDER = dict(classes=CLASSES, train_per_class=4, test_per_class=2)


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


# ---------------------------------------------------------------- cache


def test_cache_is_fast_equal_and_atomic(tmp_path):
    write_image_folder(tmp_path / "d", **dict(SMALL_FOLDER, train_per_class=30))
    first = data.load_cifar10(tmp_path / "d")
    cache_root = tmp_path / "d" / ".sgdjax_cache"
    entries = list(cache_root.iterdir())
    assert len(entries) == 1 and not any(".tmp" in e.name for e in entries)
    start = time.perf_counter()
    second = data.load_cifar10(tmp_path / "d")
    assert time.perf_counter() - start < 1.0
    chex.assert_trees_all_equal(tuple(first), tuple(second))


def test_corrupt_cache_is_rebuilt(tmp_path):
    write_image_folder(tmp_path / "d", **SMALL_FOLDER)
    first = data.load_cifar10(tmp_path / "d")
    (cache,) = list((tmp_path / "d" / ".sgdjax_cache").iterdir())
    (cache / "train_images.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.warns(UserWarning, match="cache unreadable .*; rebuilding it"):
        again = data.load_cifar10(tmp_path / "d")
    chex.assert_trees_all_equal(tuple(first), tuple(again))
    assert np.load(cache / "train_images.npy").shape == first.train_images.shape


def test_adding_an_image_invalidates_the_cache(tmp_path):
    write_image_folder(tmp_path / "d", **SMALL_FOLDER)
    assert len(data.load_cifar10(tmp_path / "d").train_images) == 12
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "d/train/cat/new.png")
    assert len(data.load_cifar10(tmp_path / "d").train_images) == 13


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda c: np.save(c / "train_labels.npy", np.zeros(5, np.int32)), "labels of shape"),
        (lambda c: np.save(c / "test_images.npy", np.zeros((6, 32, 32, 1), np.uint8)), "images of"),
        (lambda c: np.save(c / "train_images.npy", np.zeros((12, 32, 32, 3), np.int64)), "dtype"),
        (lambda c: np.save(c / "test_labels.npy", np.full(6, 3, np.int32)), "label 3 outside"),
        (lambda c: (c / "class_names.txt").write_text(""), "class names"),
    ],
    ids=["lengths", "shape", "dtype", "labels", "names"],
)
def test_inconsistent_cache_is_rebuilt_and_said(tmp_path, damage, problem):
    write_image_folder(tmp_path / "d", **SMALL_FOLDER)
    first = data.load_cifar10(tmp_path / "d")
    (cache,) = list((tmp_path / "d" / ".sgdjax_cache").iterdir())
    damage(cache)
    with pytest.warns(UserWarning, match=f"{cache.name}: cache .*{problem}.*; rebuilding it"):
        again = data.load_cifar10(tmp_path / "d")
    chex.assert_trees_all_equal(tuple(first), tuple(again))
    chex.assert_trees_all_equal(tuple(first), tuple(data.load_cifar10(tmp_path / "d")))


def test_temporaries_of_killed_writers_are_removed(tmp_path):
    write_image_folder(tmp_path / "d", **SMALL_FOLDER)
    cache_parent = tmp_path / "d" / ".sgdjax_cache"
    cache_parent.mkdir()
    # A writer killed while it wrote the cache (SIGKILL: no cleanup runs).
    writer = (
        "import os, sys, pathlib\n"
        "from sgdjax.data import _cache\n"
        "folder = _cache.make_temporary(pathlib.Path(sys.argv[1]), 'cifar10-folder-' + '0' * 16)\n"
        "(folder / 'train_images.npy').write_bytes(bytes(10000))\n"
        "os.kill(os.getpid(), 9)\n"
    )
    killed = subprocess.run([sys.executable, "-c", writer, str(cache_parent)], check=False)
    assert killed.returncode == -9
    (dead,) = list(cache_parent.iterdir())
    # One from before names carried their writer, idle for two hours.
    ownerless = cache_parent / ("cifar10-pickle-" + "1" * 16 + ".tmpab_c9")
    ownerless.mkdir()
    os.utime(ownerless, (time.time() - 7200, time.time() - 7200))
    # One of a writer still running (the test's parent process), and unrelated folders.
    running = _cache.make_temporary(cache_parent, "cifar10-folder-" + "2" * 16)
    running = running.rename(
        running.with_name(running.name.replace(f"-{os.getpid()}-", f"-{os.getppid()}-"))
    )
    unrelated = [cache_parent / "notes.tmp-0", cache_parent / ("cifar10-folder-" + "3" * 16)]
    for folder in unrelated:
        folder.mkdir()
        os.utime(folder, (time.time() - 7200, time.time() - 7200))
    data.load_cifar10(tmp_path / "d")
    assert not dead.exists() and not ownerless.exists()
    assert running.is_dir() and all(folder.is_dir() for folder in unrelated)


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


# ---------------------------------------------------------------- augmentation


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


def test_random_crop_is_a_window_of_the_padded_image():
    images = _batch()
    key = jax.random.key(3)
    out = jax.jit(lambda k, x: data.random_crop(k, x, padding=4))(key, images)
    chex.assert_shape(out, images.shape)
    chex.assert_type(out, jnp.uint8)
    offsets = np.asarray(jax.random.randint(key, (16, 2), 0, 9))
    padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)))
    for i, (dy, dx) in enumerate(offsets):
        np.testing.assert_array_equal(out[i], padded[i, dy : dy + 32, dx : dx + 32])
    assert len({tuple(o) for o in offsets}) > 1


def test_random_flip_mirrors_some_images():
    images = _batch(64)
    out = np.asarray(data.random_flip(jax.random.key(0), images))
    flipped = [np.array_equal(o, np.asarray(x)[:, ::-1]) for o, x in zip(out, images)]
    kept = [np.array_equal(o, np.asarray(x)) for o, x in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_augment_is_deterministic_per_key_and_jit_invariant():
    images = _batch()
    a = data.augment(jax.random.key(1), images)
    b = jax.jit(data.augment)(jax.random.key(1), images)
    c = data.augment(jax.random.key(2), images)
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(a, c)


def test_normalize_matches_numpy():
    images = _batch(4)
    out = jax.jit(data.normalize)(images)
    expected = (np.asarray(images) / 255.0 - np.asarray(data.CIFAR10_MEAN)) / np.asarray(
        data.CIFAR10_STD
    )
    chex.assert_type(out, jnp.float32)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    chex.assert_type(data.normalize(images, dtype=jnp.bfloat16), jnp.bfloat16)


def test_batches_order_depends_on_seed_and_epoch_only():
    images, labels = np.arange(10)[:, None], np.arange(10)
    first = [b["label"].tolist() for b in data.batches(images, labels, 3, seed=1, epoch=2)]
    again = [b["label"].tolist() for b in data.batches(images, labels, 3, seed=1, epoch=2)]
    other = [b["label"].tolist() for b in data.batches(images, labels, 3, seed=1, epoch=3)]
    assert first == again and first != other and len(first) == 3
    tail = list(data.batches(images, labels, 3, drop_remainder=False))
    assert [len(b["label"]) for b in tail] == [3, 3, 3, 1]
