"""Compare optimizers on the same model, data and seed; one plot of all of them.

    python experiments/compare.py --data-dir DATA --out runs/compare --epochs 5

Each optimizer runs the same training function as experiments/cifar.py (same
model, data order, augmentation and seed); only the optimizer changes. Writes
compare.json (per-epoch curves and final accuracy of each) and compare.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

# ---------------------------------------------------------------- the contenders

# name -> config overrides; learning rates are each optimizer's usual range.
OPTIMIZERS = {
    "sgd": dict(optimizer="sgd", momentum=0.0, nesterov=False, learning_rate=0.1),
    "momentum": dict(optimizer="sgd", momentum=0.9, nesterov=False, learning_rate=0.02),
    "nesterov": dict(optimizer="sgd", momentum=0.9, nesterov=True, learning_rate=0.02),
    "sgdw": dict(optimizer="sgdw", momentum=0.9, nesterov=True, learning_rate=0.02,
                 weight_decay=0.05),
    "lars": dict(optimizer="lars", momentum=0.9, nesterov=False, learning_rate=1.0),
    "schedule_free": dict(optimizer="schedule_free", momentum=0.9, learning_rate=0.05),
    "lookahead": dict(optimizer="lookahead", momentum=0.9, nesterov=True, learning_rate=0.02),
    "sam": dict(optimizer="sgd", momentum=0.9, nesterov=True, learning_rate=0.02,
                sam_rho=0.05),
    "adam": dict(optimizer="adam", learning_rate=2e-3, weight_decay=0.0),
    "adamw": dict(optimizer="adamw", learning_rate=2e-3, weight_decay=0.05),
    "nadam": dict(optimizer="nadam", learning_rate=2e-3, weight_decay=0.0),
    "adagrad": dict(optimizer="adagrad", learning_rate=0.05, weight_decay=0.0),
}  # fmt: skip


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for name, result in results.items():
        epochs = [row["epoch"] for row in result["history"]]
        loss_axis.plot(epochs, [row["train_loss"] for row in result["history"]], "o-", label=name)
        accuracy_axis.plot(
            epochs, [row["test_accuracy"] for row in result["history"]], "o-", label=name
        )
    loss_axis.set(xlabel="epoch", ylabel="train loss", title="training loss")
    accuracy_axis.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    from sgdjax import data
    from sgdjax.training import PRESETS, Config, train_and_evaluate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--preset", default="tutorial", choices=sorted(PRESETS))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--max-steps", type=int, help="limit steps per epoch (smoke tests)")
    parser.add_argument("--train-subset", type=int)
    parser.add_argument("--test-subset", type=int)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.epochs <= 0:
        parser.error(f"--epochs must be positive, got {args.epochs}")
    try:
        dataset = data.load_cifar10(args.data_dir)
    except data.DataError as error:
        parser.error(str(error))

    out = Path(args.out)
    results = {}
    for name in args.optimizers:
        values = dict(PRESETS[args.preset])
        values.update(OPTIMIZERS[name])
        values.update(epochs=args.epochs, seed=args.seed, max_steps=args.max_steps,
                      train_subset=args.train_subset, test_subset=args.test_subset)  # fmt: skip
        if args.batch_size:
            values["batch_size"] = args.batch_size
        config = Config(**values)
        print(f"== {name}: {config.optimizer}, lr {config.learning_rate}")
        summary = train_and_evaluate(
            config, out / name, progress=not args.no_progress, dataset=dataset
        )
        history = [json.loads(r) for r in (out / name / "metrics.jsonl").read_text().splitlines()]
        results[name] = {
            "test_accuracy": summary["test_accuracy"],
            "wall_seconds": summary["wall_seconds"],
            "config": dataclasses.asdict(config),
            "history": history,
        }
    (out / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "compare.png")
    print("\noptimizer     test accuracy")
    for name, result in sorted(results.items(), key=lambda item: -item[1]["test_accuracy"]):
        print(f"{name:12s}  {result['test_accuracy']:.4f}")
    return results


if __name__ == "__main__":
    main()
