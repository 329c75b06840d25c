"""Compare optimizers on the same model, data and seeds; a table and one plot.

    python experiments/compare.py --data-dir DATA --out runs/compare --epochs 5 --seeds 0 1 2

Each optimizer runs the same training function as experiments/cifar.py (same
model, data order, augmentation and seed); only the optimizer changes. Every
(seed, optimizer) run goes into OUT/seed-S/NAME; a finished run with the same
settings is reused, so an interrupted comparison continues where it stopped and
more optimizers can be added later. Writes compare.json (per-run curves and
final accuracy), compare.md (test accuracy over seeds: mean, standard deviation,
min and max) and compare.png (mean test accuracy per epoch).

    python experiments/compare.py --full-batch --train-subset 2000 --epochs 5 --out runs/fb

``--full-batch`` compares minibatch SGD (the preset's optimizer and batch size)
with full-batch gradient descent on the whole training subset per step, at the
same number of epochs and at the same number of steps (gradient evaluations);
no augmentation in any of the three. Its table is compare.md, its plot of train
loss and test accuracy against steps compare.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
from pathlib import Path

# ---------------------------------------------------------------- the contenders

# name -> config overrides; learning rates are each optimizer's usual range. Those of
# asgd (0.05, 0.1, 0.2, 0.4), muon's matrices (0.01, 0.03, 0.1) and swa_lr (0.005, 0.01)
# are the best of a one-seed sweep: 5 epochs on 5,000 training images, 2,000 test.
OPTIMIZERS = {
    "sgd": dict(optimizer="sgd", momentum=0.0, nesterov=False, learning_rate=0.1),
    "momentum": dict(optimizer="sgd", momentum=0.9, nesterov=False, learning_rate=0.02),
    "nesterov": dict(optimizer="sgd", momentum=0.9, nesterov=True, learning_rate=0.02),
    "sgdw": dict(optimizer="sgdw", momentum=0.9, nesterov=True, learning_rate=0.02,
                 weight_decay=0.05),
    "lars": dict(optimizer="lars", momentum=0.9, nesterov=False, learning_rate=0.3),
    "schedule_free": dict(optimizer="schedule_free", momentum=0.9, learning_rate=0.05),
    "lookahead": dict(optimizer="sgd", momentum=0.9, nesterov=True, learning_rate=0.02,
                      lookahead_period=5, lookahead_decay=0.5),
    "sam": dict(optimizer="sgd", momentum=0.9, nesterov=True, learning_rate=0.02,
                sam_rho=0.05),
    "ema": dict(optimizer="sgd", momentum=0.9, nesterov=True, learning_rate=0.02,
                ema_decay=0.999),
    "asgd": dict(optimizer="asgd", learning_rate=0.4, asgd_start=0.5),
    "muon": dict(optimizer="muon", momentum=0.9, nesterov=True, learning_rate=0.02,
                 muon_learning_rate=0.03, muon_momentum=0.95),
    "swa": dict(optimizer="sgd", momentum=0.9, nesterov=True, learning_rate=0.02,
                swa_start=0.6, swa_lr=0.01, swa_anneal_epochs=1.0),
    "adam": dict(optimizer="adam", learning_rate=2e-3, weight_decay=0.0),
    "adamw": dict(optimizer="adamw", learning_rate=2e-3, weight_decay=0.05),
    "nadam": dict(optimizer="nadam", learning_rate=2e-3, weight_decay=0.0),
    "adagrad": dict(optimizer="adagrad", learning_rate=0.05, weight_decay=0.0),
}  # fmt: skip


def summarize(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per optimizer: test accuracy over seeds (mean, sample std, min, max) and mean time."""
    table = {}
    for name, by_seed in runs.items():
        accuracies = [by_seed[seed]["test_accuracy"] for seed in sorted(by_seed)]
        seconds = [by_seed[seed]["wall_seconds"] for seed in sorted(by_seed)]
        table[name] = {
            "seeds": sorted(by_seed),
            "mean": statistics.fmean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,  # JSON null
            "min": min(accuracies),
            "max": max(accuracies),
            "wall_seconds": statistics.fmean(seconds),
        }
    return table


def markdown_table(table: dict[str, dict], epochs: int) -> str:
    """The summary as a markdown table, best mean first."""
    lines = [
        f"| optimizer | test accuracy ({epochs} epochs), mean ± std | min | max | seeds "
        "| wall s / run |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in sorted(table.items(), key=lambda item: -item[1]["mean"]):
        spread = "" if row["std"] is None else f" ± {100 * row['std']:.2f}"
        lines.append(
            f"| {name} | {100 * row['mean']:.2f}{spread} | {100 * row['min']:.2f} "
            f"| {100 * row['max']:.2f} | {len(row['seeds'])} | {row['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _mean_curve(by_seed: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    histories = [run["history"] for run in by_seed.values()]
    length = min(len(history) for history in histories)
    epochs = [row["epoch"] for row in histories[0][:length]]
    return epochs, [statistics.fmean(h[i][key] for h in histories) for i in range(length)]


def plot(runs: dict[str, dict[int, dict]], path: Path) -> None:
    """Training loss and test accuracy per epoch, each the mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sgdjax.training import save_figure

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for name, by_seed in runs.items():
        loss_axis.plot(*_mean_curve(by_seed, "train_loss"), "o-", label=name)
        accuracy_axis.plot(*_mean_curve(by_seed, "test_accuracy"), "o-", label=name)
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
    note = f"mean over seeds {seeds}"
    loss_axis.set(xlabel="epoch", ylabel="train loss", title=f"training loss ({note})")
    accuracy_axis.set(xlabel="epoch", ylabel="test accuracy", title=f"test accuracy ({note})")
    save_figure(figure, (loss_axis, accuracy_axis), path, legend_size=8)


# ---------------------------------------------------------------- full batch against minibatch

# No augmentation in any of the three runs: full-batch gradient descent then sees
# the same gradient of the same loss every epoch, and the runs differ only in the
# batch they average the gradient over.
NO_AUGMENTATION = dict(flip="none", crop_padding=0, translate=0, tta="none")


def full_batch_runs(batch_size: int, epochs: int, train_subset: int) -> dict[str, dict]:
    """name -> config overrides: minibatch SGD and full-batch gradient descent twice.

    ``minibatch``: ``epochs`` epochs of ``batch_size``, ``S = epochs * (N // batch_size)``
    steps. ``full_batch_epochs``: the whole subset (``N`` examples) per step for the
    same epochs (``epochs`` steps, the same examples processed). ``full_batch_steps``:
    the whole subset per step for the same ``S`` steps (gradient evaluations), that
    is ``S`` epochs and ``N // batch_size`` times the examples processed. Evaluation
    and checkpoints fall at the same step counts as the minibatch run's epochs.
    """
    steps_per_epoch = train_subset // batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"--train-subset {train_subset} is smaller than the batch size {batch_size}"
        )
    steps = epochs * steps_per_epoch
    return {
        "minibatch": dict(NO_AUGMENTATION, batch_size=batch_size, epochs=epochs),
        "full_batch_epochs": dict(NO_AUGMENTATION, batch_size=train_subset, epochs=epochs),
        "full_batch_steps": dict(NO_AUGMENTATION, batch_size=train_subset, epochs=steps,
                                 eval_every=steps_per_epoch, checkpoint_every=0),
    }  # fmt: skip


def full_batch_table(runs: dict[str, dict[int, dict]]) -> str:
    """Markdown: per run its batch, steps, examples processed and the scores over seeds."""
    lines = [
        "| run | batch | steps (gradient evaluations) | examples processed | epochs "
        "| final train loss | test accuracy, mean ± std | wall s / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, by_seed in runs.items():
        seeds = sorted(by_seed)
        config = by_seed[seeds[0]]["config"]
        steps = by_seed[seeds[0]]["history"][-1]["step"]
        accuracies = [by_seed[seed]["test_accuracy"] for seed in seeds]
        losses = [by_seed[seed]["history"][-1]["train_loss"] for seed in seeds]
        seconds = [by_seed[seed]["wall_seconds"] for seed in seeds]
        spread = f" ± {100 * statistics.stdev(accuracies):.2f}" if len(seeds) > 1 else ""
        lines.append(
            f"| {name} | {config['batch_size']} | {steps} | {steps * config['batch_size']} "
            f"| {config['epochs']:g} | {statistics.fmean(losses):.4f} "
            f"| {100 * statistics.fmean(accuracies):.2f}{spread} "
            f"| {statistics.fmean(seconds):.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot_against_steps(runs: dict[str, dict[int, dict]], path: Path) -> None:
    """Training loss and test accuracy against steps (gradient evaluations), seed by seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sgdjax.training import save_figure

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for name, by_seed in runs.items():
        for seed, run in sorted(by_seed.items()):
            label = name if len(by_seed) == 1 else f"{name}, seed {seed}"
            rows = run["history"]
            loss_axis.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], label=label)
            tested = [r for r in rows if r.get("test_accuracy") is not None]
            accuracy_axis.plot([r["step"] for r in tested],
                               [r["test_accuracy"] for r in tested], "o-", label=label)  # fmt: skip
    loss_axis.set(xlabel="step (gradient evaluations)", ylabel="train loss", xscale="log")
    accuracy_axis.set(xlabel="step (gradient evaluations)", ylabel="test accuracy", xscale="log")
    save_figure(figure, (loss_axis, accuracy_axis), path, legend_size=8)


def _finished(folder: Path, config_dict: dict, defaults: dict) -> dict | None:
    """The saved run in ``folder`` if it finished with exactly these settings.

    A setting missing from the saved config (one added to ``Config`` since) counts as
    its default, so older runs stay valid when new options appear.
    """
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        return None
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError:
        return None
    saved = summary.get("config", {})
    if set(saved) - set(config_dict):
        return None
    same = all(saved.get(key, defaults.get(key)) == value for key, value in config_dict.items())
    return summary if same else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS,
                        help="the contenders (default: all)")  # fmt: skip
    parser.add_argument(
        "--full-batch", action="store_true",
        help="instead of optimizers: the preset's minibatch SGD beside full-batch gradient "
        "descent at the same epochs and at the same steps (needs --train-subset)",
    )  # fmt: skip
    parser.add_argument("--preset", default="tutorial", choices=["tutorial", "resnet9"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float,
                        help="one peak learning rate for every run (default: each "
                        "run's own)")  # fmt: skip
    parser.add_argument("--schedule",
                        help="learning-rate schedule of every run, one of cifar.py's --schedule "
                        "choices (default: the preset's)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument(
        "--host-devices", type=int,
        help="split the CPU into N devices and train sharded over them (same numbers, "
        "faster on multi-core CPUs)",
    )  # fmt: skip
    parser.add_argument("--max-steps", type=int, help="limit steps per epoch (smoke tests)")
    parser.add_argument("--train-subset", type=int)
    parser.add_argument("--test-subset", type=int)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.epochs <= 0:
        parser.error(f"--epochs must be positive, got {args.epochs}")
    if any(seed < 0 for seed in args.seeds):
        parser.error(f"--seeds must be >= 0, got {args.seeds}")
    if args.full_batch and args.optimizers:
        parser.error("--full-batch runs the preset's own optimizer: drop --optimizers")
    if args.full_batch and not args.train_subset:
        parser.error("--full-batch needs --train-subset N (the batch of gradient descent)")
    if args.host_devices is not None:
        from sgdjax.parallel import use_cpu_devices

        try:
            use_cpu_devices(args.host_devices)
        except (ValueError, RuntimeError) as error:
            parser.error(f"--host-devices: {error}")

    from sgdjax import data
    from sgdjax.training import PRESETS, Config, ConfigError, SetupError, train_and_evaluate

    try:
        dataset = data.load_cifar10(args.data_dir)
    except data.DataError as error:
        parser.error(str(error))

    defaults = json.loads(json.dumps(dataclasses.asdict(Config())))
    out = Path(args.out)
    if args.full_batch:
        batch_size = args.batch_size or PRESETS[args.preset].batch_size
        try:
            contenders = full_batch_runs(batch_size, args.epochs, args.train_subset)
        except ValueError as error:
            parser.error(str(error))
    else:
        batch = {"batch_size": args.batch_size} if args.batch_size else {}
        contenders = {
            name: dict(OPTIMIZERS[name], epochs=args.epochs, **batch)
            for name in args.optimizers or OPTIMIZERS
        }
    runs: dict[str, dict[int, dict]] = {name: {} for name in contenders}
    for seed in args.seeds:
        for name in contenders:
            values = dict(contenders[name])
            values.update(seed=seed, max_steps=args.max_steps,
                          train_subset=args.train_subset, test_subset=args.test_subset)  # fmt: skip
            if args.learning_rate is not None:
                values.update(learning_rate=args.learning_rate)
            if args.schedule is not None:
                values.update(schedule=args.schedule)
            if args.host_devices and args.host_devices > 1:
                values.update(parallel="sharded", num_devices=args.host_devices)
            try:
                config = dataclasses.replace(PRESETS[args.preset], **values)
            except ConfigError as error:
                parser.error(f"{name}: {error}")
            folder = out / f"seed-{seed}" / name
            summary = _finished(
                folder, json.loads(json.dumps(dataclasses.asdict(config))), defaults
            )
            if summary is None:
                if folder.exists():
                    shutil.rmtree(folder)  # an unfinished or different run: start afresh
                print(f"== seed {seed}, {name}: {config.optimizer}, lr {config.learning_rate}")
                try:
                    summary = train_and_evaluate(
                        config, folder, progress=not args.no_progress, dataset=dataset
                    )
                except SetupError as error:
                    parser.error(f"{name}: {error}")
            else:
                print(f"== seed {seed}, {name}: finished before, reused")
            history = [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]
            runs[name][seed] = {
                "test_accuracy": summary["test_accuracy"],
                "wall_seconds": summary["wall_seconds"],
                "config": dataclasses.asdict(config),
                "history": history,
            }
    table = summarize(runs)
    (out / "compare.json").write_text(json.dumps({"summary": table, "runs": runs}, indent=2) + "\n")
    if args.full_batch:
        markdown = full_batch_table(runs)
        plot_against_steps(runs, out / "compare.png")
    else:
        markdown = markdown_table(table, args.epochs)
        plot(runs, out / "compare.png")
    (out / "compare.md").write_text(markdown)
    print()
    print(markdown, end="")
    return {"summary": table, "runs": runs}


if __name__ == "__main__":
    main()
