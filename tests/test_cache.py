"""sgdjax/data/_cache.py: the .npy cache is fast, equal, atomic, invalidated by a new image,
rebuilt when damaged; killed writers' temporaries are removed."""

import os
import subprocess
import sys
import time

import chex
import numpy as np
import pytest
from helpers import SMALL_FOLDER, write_image_folder
from PIL import Image

from sgdjax import data
from sgdjax.data import _cache

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
