"""The learning-rate range test (Smith 2017): a plot and a suggested learning rate.

    python experiments/lr_find.py --data-dir DATA --out runs/lr_find [--model convnet]

Trains from scratch while the learning rate grows exponentially from --start to
--end over --steps steps, records the smoothed training loss at each rate, stops
early once the loss exceeds 4x its best, and suggests the rate where the smoothed
loss falls fastest. Writes lr_find.json and lr_find.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------- the test


def suggest(rates: np.ndarray, losses: np.ndarray) -> float:
    """The rate at the steepest descent of the smoothed loss against log(rate)."""
    if len(rates) < 3:
        return float(rates[np.argmin(losses)])
    slopes = np.gradient(losses, np.log(rates))
    best = int(np.argmin(losses))
    index = int(np.argmin(slopes[: best + 1])) if best > 0 else 0
    return float(rates[index])


def run_range_test(dataset, *, model_name, batch_size, start, end, steps, momentum,
                   weight_decay, seed, smoothing=0.05):  # fmt: skip
    """The range test through the training engine: one step per program, read each step.

    The learning rate at step ``t`` is ``start * (end / start) ** (t / (steps - 1))``
    (the engine's exponential schedule over the run's total steps).
    """
    from sgdjax import training

    config = training.Config(
        model=model_name, batch_size=batch_size, learning_rate=start, momentum=momentum,
        nesterov=False, weight_decay=weight_decay, seed=seed, schedule="exponential",
        epochs=math.ceil(steps / max(len(dataset.train_images) // batch_size, 1)),
        steps_per_call=1, tensorboard=False,
    )  # fmt: skip
    total = training.plan_run(config, len(dataset.train_images)).total_steps
    config = dataclasses.replace(config, exponential_final=(end / start) ** (total / (steps - 1)))
    engine = training.Engine(config, dataset, log=lambda line: None)
    rates, smoothed, raw = [], [], []
    average, best = 0.0, math.inf
    for metrics in engine.chunk_metrics(seed):
        loss, rate = metrics["loss"], metrics["learning_rate"]
        average = smoothing * loss + (1 - smoothing) * average
        debiased = average / (1 - (1 - smoothing) ** (len(rates) + 1))
        rates.append(rate)
        raw.append(loss)
        smoothed.append(debiased)
        best = min(best, debiased)
        if len(rates) >= steps or not math.isfinite(loss) or debiased > 4 * best:
            break
    return np.asarray(rates), np.asarray(smoothed), np.asarray(raw)


def plot(rates, smoothed, raw, suggestion, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(rates, raw, alpha=0.3, label="loss")
    axis.plot(rates, smoothed, label="smoothed loss")
    axis.axvline(suggestion, color="red", linestyle="--", label=f"suggested {suggestion:.2g}")
    axis.set(xscale="log", xlabel="learning rate", ylabel="training loss",
             title="learning-rate range test")  # fmt: skip
    finite = smoothed[np.isfinite(smoothed)]
    if finite.size:
        axis.set_ylim(finite.min() * 0.9, min(finite.max(), 4 * finite.min()) * 1.1)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    from sgdjax import data
    from sgdjax.training import MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnet", choices=sorted(MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--start", type=float, default=1e-5)
    parser.add_argument("--end", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default="runs/lr_find")
    args = parser.parse_args(argv)
    if not 0 < args.start < args.end:
        parser.error(f"need 0 < --start < --end, got {args.start} and {args.end}")
    if args.steps < 3 or args.batch_size <= 0:
        parser.error("--steps must be >= 3 and --batch-size positive")
    try:
        dataset = data.load_cifar10(args.data_dir)
    except data.DataError as error:
        parser.error(str(error))
    if len(dataset.train_images) < args.batch_size:
        parser.error(
            f"--batch-size {args.batch_size} is larger than the "
            f"{len(dataset.train_images)} training images"
        )

    rates, smoothed, raw = run_range_test(
        dataset, model_name=args.model, batch_size=args.batch_size, start=args.start,
        end=args.end, steps=args.steps, momentum=args.momentum,
        weight_decay=args.weight_decay, seed=args.seed,
    )  # fmt: skip
    suggestion = suggest(rates, smoothed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "suggested_learning_rate": suggestion,
        "learning_rates": rates.tolist(),
        "smoothed_loss": smoothed.tolist(),
        "loss": raw.tolist(),
        "config": vars(args),
    }
    (out / "lr_find.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rates, smoothed, raw, suggestion, out / "lr_find.png")
    print(f"suggested learning rate: {suggestion:.3g} (steps run: {len(rates)})")
    return result


if __name__ == "__main__":
    main()
