"""sgdjax/data/_batches.py: the batch order depends on the seed and the epoch only."""

import numpy as np

from sgdjax import data


def test_batches_order_depends_on_seed_and_epoch_only():
    images, labels = np.arange(10)[:, None], np.arange(10)
    first = [b["label"].tolist() for b in data.batches(images, labels, 3, seed=1, epoch=2)]
    again = [b["label"].tolist() for b in data.batches(images, labels, 3, seed=1, epoch=2)]
    other = [b["label"].tolist() for b in data.batches(images, labels, 3, seed=1, epoch=3)]
    assert first == again and first != other and len(first) == 3
    tail = list(data.batches(images, labels, 3, drop_remainder=False))
    assert [len(b["label"]) for b in tail] == [3, 3, 3, 1]
