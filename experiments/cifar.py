"""Train a CNN on CIFAR-10 with sgdjax.

    python experiments/cifar.py --preset tutorial --data-dir DATA --out runs/tutorial

Writes metrics.jsonl, summary.json, curves.png and checkpoints/ into --out.
Continue an interrupted run with --resume. Every flag is checked before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

# ---------------------------------------------------------------- CPU devices


def split_host_into_devices(argv: list[str]) -> None:
    """Honours ``--host-devices N`` before JAX starts: the CPU becomes N devices.

    XLA runs one CPU device's step on few threads; split into several devices and
    trained with ``--parallel sharded``, the same cores run the shards side by side
    (measured: 4.2x the images/s of one device for the ConvNet on 2 cores, see
    benchmarks/scaling.py). The setting only takes effect in a fresh process.
    """
    for index, argument in enumerate(argv):
        value = None
        if argument == "--host-devices" and index + 1 < len(argv):
            value = argv[index + 1]
        elif argument.startswith("--host-devices="):
            value = argument.split("=", 1)[1]
        if value is not None and value.isdigit() and int(value) > 0 and "jax" not in sys.modules:
            flags = os.environ.get("XLA_FLAGS", "")
            if "xla_force_host_platform_device_count" not in flags:
                os.environ["XLA_FLAGS"] = (
                    f"{flags} --xla_force_host_platform_device_count={value}".strip()
                )


# ---------------------------------------------------------------- flags

PRESET_NAMES = ("tutorial", "resnet9", "speedrun")


def build_parser() -> argparse.ArgumentParser:
    from sgdjax.training import MODELS, MODES
    from sgdjax.training._config import OPTIMIZERS, SCHEDULES

    parser = argparse.ArgumentParser(
        description="Train a CNN on CIFAR-10 with sgdjax.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", choices=PRESET_NAMES, default="tutorial")
    parser.add_argument("--model", choices=sorted(MODELS))
    parser.add_argument("--epochs", type=float, help="whole epochs (speedrun: fractions too)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--momentum", type=float)
    parser.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--dampening", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--schedule", choices=SCHEDULES)
    parser.add_argument("--clip-norm", type=float, help="clip gradients by this global norm")
    parser.add_argument("--optimizer", choices=OPTIMIZERS)
    parser.add_argument("--label-smoothing", type=float)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--crop-padding", type=int, help="random-crop padding (0: flips only)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--flip-tta", action=argparse.BooleanOptionalAction, default=None,
        help="evaluate on each test image and its mirror image, averaging the logits",
    )  # fmt: skip
    parser.add_argument("--seed", type=int)
    parser.add_argument("--data-dir", help="CIFAR-10 folder (default: tensorflow-datasets)")
    parser.add_argument("--out", default="runs/cifar", help="output directory")
    parser.add_argument("--checkpoint-every", type=int, help="epochs between checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    parser.add_argument("--max-steps", type=int, help="limit steps per epoch (smoke tests)")
    parser.add_argument("--train-subset", type=int, help="use the first N training images")
    parser.add_argument("--test-subset", type=int, help="use the first N test images")
    parser.add_argument("--max-bad-steps", type=int, help="stop after N non-finite steps in a row")
    parser.add_argument("--parallel", choices=MODES, help="data-parallel mode")
    parser.add_argument("--num-devices", type=int, help="devices to use (default: all)")
    parser.add_argument(
        "--host-devices", type=int,
        help="split the CPU into N devices (use with --parallel sharded); CPU only",
    )  # fmt: skip
    parser.add_argument("--accumulate", type=int, help="micro-batches per update")
    parser.add_argument("--sam-rho", type=float, help="sharpness-aware minimization radius")
    parser.add_argument(
        "--ema-decay", type=float,
        help="keep a moving average of weights and BatchNorm statistics; evaluate it",
    )  # fmt: skip
    parser.add_argument(
        "--diagnostics", action="store_true", default=None,
        help="log per-layer gradient/update norms and draw diagnostics.png",
    )  # fmt: skip
    parser.add_argument(
        "--coordinator", help="multi-host: host:port of process 0 (or SGDJAX_COORDINATOR)"
    )
    parser.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, help="multi-host: this process's index")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--runs", type=int,
        help="speedrun: train this many times (seeds --seed, --seed + 1, ...) after one compile",
    )  # fmt: skip
    parser.add_argument(
        "--widths", type=int, nargs=3, metavar="W",
        help="speedrun: channels of the three conv blocks (default 64 256 256)",
    )  # fmt: skip
    return parser


def make_config(args: argparse.Namespace):
    """The preset's config with every given flag laid over it."""
    from sgdjax.training._config import PRESETS, Config

    values = dict(PRESETS[args.preset])
    for field in dataclasses.fields(Config):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = given
    return Config(**values)


def validate(config, args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Checks every flag before any work; errors exit with one line and status 2."""
    positive = {
        "--epochs": config.epochs,
        "--batch-size": config.batch_size,
        "--checkpoint-every": config.checkpoint_every,
        "--max-bad-steps": config.max_bad_steps,
    }
    for flag, value in positive.items():
        if value <= 0:
            parser.error(f"{flag} must be positive, got {value}")
    if config.seed < 0:
        parser.error(f"--seed must be >= 0, got {config.seed}")
    for flag, value in (
        ("--max-steps", config.max_steps),
        ("--train-subset", config.train_subset),
        ("--test-subset", config.test_subset),
    ):
        if value is not None and value <= 0:
            parser.error(f"{flag} must be positive, got {value}")
    if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
        parser.error(f"--learning-rate must be a positive number, got {config.learning_rate}")
    if not 0 <= config.momentum < 1:
        parser.error(f"--momentum must lie in [0, 1), got {config.momentum}")
    if not 0 <= config.dampening <= 1:
        parser.error(f"--dampening must lie in [0, 1], got {config.dampening}")
    if config.optimizer in ("sgd", "sgdw") and config.nesterov:
        if config.momentum == 0 or config.dampening != 0:
            parser.error(
                "--nesterov needs --momentum > 0 and --dampening 0 "
                f"(got momentum {config.momentum}, dampening {config.dampening})"
            )
    if not (config.weight_decay >= 0 and math.isfinite(config.weight_decay)):
        parser.error(f"--weight-decay must be >= 0, got {config.weight_decay}")
    if config.clip_norm is not None and not config.clip_norm > 0:
        parser.error(f"--clip-norm must be positive, got {config.clip_norm}")
    if config.crop_padding < 0:
        parser.error(f"--crop-padding must be >= 0, got {config.crop_padding}")
    if not 0 <= config.label_smoothing < 1:
        parser.error(f"--label-smoothing must lie in [0, 1), got {config.label_smoothing}")

    if config.ema_decay is not None and not 0.0 <= config.ema_decay < 1.0:
        parser.error(f"--ema-decay must lie in [0, 1), got {config.ema_decay}")
    if config.sam_rho is not None and not config.sam_rho > 0:
        parser.error(f"--sam-rho must be positive, got {config.sam_rho}")
    if config.sam_rho is not None and config.accumulate > 1:
        parser.error("--sam-rho cannot be combined with --accumulate")
    if args.host_devices is not None and args.host_devices <= 0:
        parser.error(f"--host-devices must be positive, got {args.host_devices}")
    if config.accumulate <= 0:
        parser.error(f"--accumulate must be positive, got {config.accumulate}")
    if config.batch_size % config.accumulate:
        parser.error(
            f"--batch-size {config.batch_size} is not divisible by --accumulate {config.accumulate}"
        )

    import jax

    available = jax.device_count()
    if config.num_devices is not None and not 0 < config.num_devices <= available:
        parser.error(f"--num-devices {config.num_devices}: only {available} device(s) exist")
    if config.parallel != "none":
        devices = config.num_devices or available
        if (config.batch_size // config.accumulate) % devices:
            parser.error(
                f"--batch-size {config.batch_size} (per micro-batch "
                f"{config.batch_size // config.accumulate}) is not divisible by the device "
                f"count {devices}"
            )

    out = check_out(args.out, parser)
    from sgdjax.training import Checkpointer

    if args.resume and not (out / "checkpoints").is_dir():
        parser.error(f"--resume: no checkpoints in {out / 'checkpoints'}")
    if not args.resume and Checkpointer.saved_epochs(out / "checkpoints"):
        parser.error(
            f"--out {out} already holds checkpoints of a run: continue it with --resume, "
            "or choose another --out"
        )


def check_out(out: str, parser: argparse.ArgumentParser) -> Path:
    """Creates ``out`` and checks that files can be written there."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        parser.error(f"--out {out}: cannot write there ({error.strerror or error})")
    return out


# ---------------------------------------------------------------- speed run

# flag -> SpeedrunConfig field; every other training flag does not apply.
SPEEDRUN_FLAGS = {
    "epochs": "epochs", "batch_size": "batch_size", "learning_rate": "learning_rate",
    "momentum": "momentum", "weight_decay": "weight_decay",
    "label_smoothing": "label_smoothing", "bf16": "bf16", "seed": "seed",
    "max_steps": "max_steps", "flip_tta": "tta", "widths": "widths",
}  # fmt: skip
SPEEDRUN_EXTRA = {"preset", "data_dir", "out", "no_progress", "runs", "train_subset",
                  "test_subset", "coordinator", "num_processes", "process_id"}  # fmt: skip


def run_speedrun(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """``--preset speedrun``: the airbench-style recipe, timed over ``--runs`` seeds."""
    import json

    from sgdjax.training import SpeedrunConfig, speedrun
    from sgdjax.training._loop import environment

    for name, value in vars(args).items():
        if value not in (None, False) and name not in SPEEDRUN_FLAGS and name not in SPEEDRUN_EXTRA:
            parser.error(f"--{name.replace('_', '-')} does not apply to --preset speedrun")
    runs = 1 if args.runs is None else args.runs
    if runs <= 0:
        parser.error(f"--runs must be positive, got {runs}")
    for flag in ("train_subset", "test_subset"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {value}")
    given = {
        SPEEDRUN_FLAGS[k]: v for k, v in vars(args).items() if k in SPEEDRUN_FLAGS and v is not None
    }
    try:
        config = SpeedrunConfig(**given)
    except ValueError as error:
        parser.error(f"--preset speedrun: {error}")
    out = check_out(args.out, parser)
    dataset = load_data(args, parser)
    train_images, train_labels = dataset.train_images, dataset.train_labels
    test_images, test_labels = dataset.test_images, dataset.test_labels
    if args.train_subset:
        train_images, train_labels = (
            train_images[: args.train_subset],
            train_labels[: args.train_subset],
        )
    if args.test_subset:
        test_images, test_labels = test_images[: args.test_subset], test_labels[: args.test_subset]
    if len(train_images) < config.batch_size:
        parser.error(
            f"--batch-size {config.batch_size} is larger than the "
            f"{len(train_images)} training images"
        )
    result = speedrun(config, train_images, train_labels, test_images, test_labels, runs=runs)
    result["environment"] = environment()
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    spread = "" if runs == 1 else f" ± {100 * result['accuracy_std']:.2f}"
    time_spread = "" if runs == 1 else f" ± {result['seconds_std']:.2f}"
    print(
        f"speedrun: {runs} run(s), accuracy {100 * result['accuracy_mean']:.2f}%{spread}, "
        f"{result['seconds_mean']:.2f}{time_spread} s per run without compile, "
        f"{result['seconds_with_compile_mean']:.2f} s with compile "
        f"({result['compile_seconds']:.1f} s) on {result['device']}"
    )
    return result


def load_data(args, parser):
    from sgdjax import data

    try:
        return data.load_cifar10(args.data_dir)
    except data.DataError as error:
        parser.error(str(error))


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    from sgdjax.parallel import initialize_distributed

    try:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    except ValueError as error:
        parser.error(str(error))
    if args.preset == "speedrun":
        return run_speedrun(args, parser)
    for flag in ("runs", "widths"):
        if getattr(args, flag) is not None:
            parser.error(f"--{flag} applies to --preset speedrun only")
    if args.epochs is not None:
        if not float(args.epochs).is_integer():
            parser.error(f"--epochs must be a whole number here, got {args.epochs}")
        args.epochs = int(args.epochs)
    config = make_config(args)
    validate(config, args, parser)
    dataset = load_data(args, parser)
    if config.train_subset is not None and config.train_subset < config.batch_size:
        parser.error(
            f"--train-subset {config.train_subset} is smaller than --batch-size {config.batch_size}"
        )

    from sgdjax.training import train_and_evaluate

    return train_and_evaluate(
        config,
        args.out,
        resume=args.resume,
        progress=not args.no_progress,
        dataset=dataset,
    )


if __name__ == "__main__":
    split_host_into_devices(sys.argv[1:])
    main()
