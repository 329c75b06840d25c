"""Host-side minibatch iteration with a reproducible order."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def num_batches(num_examples: int, batch_size: int, *, drop_remainder: bool = True) -> int:
    """How many batches :func:`batches` yields for ``num_examples`` examples."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    if drop_remainder:
        return num_examples // batch_size
    return -(-num_examples // batch_size)


def epoch_order(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation that depends only on (seed, epoch).

    Deriving the order from ``(seed, epoch)`` rather than from a running generator
    lets a resumed run continue with exactly the data order of an uninterrupted one.
    """
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int | None = None,
    epoch: int = 0,
    drop_remainder: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields ``{"image", "label"}`` minibatches, shuffled by ``(seed, epoch)`` if seeded.

    Args:
      images: ``(N, ...)`` array.
      labels: ``(N,)`` array.
      batch_size: examples per batch, positive.
      seed: shuffle seed; ``None`` keeps the stored order.
      epoch: the epoch number, mixed into the shuffle.
      drop_remainder: leave out a last, smaller batch.

    Yields:
      Dicts of numpy arrays.
    """
    if len(images) != len(labels):
        raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
    count = num_batches(len(images), batch_size, drop_remainder=drop_remainder)
    order = None if seed is None else epoch_order(len(images), seed=seed, epoch=epoch)
    for index in range(count):
        selection = slice(index * batch_size, (index + 1) * batch_size)
        if order is not None:
            selection = np.sort(order[selection])  # sorted gathers read memory in order
        yield {"image": images[selection], "label": labels[selection]}
