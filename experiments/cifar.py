"""Train a CNN on CIFAR-10 with sgdjax.

    python experiments/cifar.py --preset tutorial --data-dir DATA --out runs/tutorial
    python experiments/cifar.py --preset speedrun --runs 5 --data-dir DATA --out runs/speed

Writes metrics.jsonl, summary.json, curves.png, tensorboard/ and checkpoints/ into
--out (with --runs N: one such folder per seed and a summary.json with mean and
spread). Continue an interrupted run with --resume. Every training flag is a field of
sgdjax.training.Config (its help text is the field's); every flag is checked before
any work, and a bad one is a one-line error with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path

# ---------------------------------------------------------------- flags


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`Config` field: its type, choices and help from the field."""
    from sgdjax.training import Config

    hints = typing.get_type_hints(Config)
    group = parser.add_argument_group("training (fields of sgdjax.training.Config)")
    for field in dataclasses.fields(Config):
        hint = hints[field.name]
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
        base = typing.get_args(hint)[0] if optional else hint
        if typing.get_origin(base) is tuple:
            options = dict(type=int, nargs="+", metavar="N")
        elif base is bool:
            options = dict(action=argparse.BooleanOptionalAction)
        else:
            options = dict(type=base, choices=field.metadata.get("choices"))
        group.add_argument(_flag(field.name), default=None, help=field.metadata["help"], **options)


def build_parser() -> argparse.ArgumentParser:
    from sgdjax.training import PRESETS

    parser = argparse.ArgumentParser(
        description="Train a CNN on CIFAR-10 with sgdjax. Unset training flags take the "
        "preset's value.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tutorial")
    parser.add_argument("--data-dir", help="CIFAR-10 folder (default: tensorflow-datasets)")
    parser.add_argument("--out", default="runs/cifar", help="output directory")
    parser.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    parser.add_argument(
        "--accept-config-changes", action="store_true",
        help="--resume even though the config differs from the checkpoint's (listed)",
    )  # fmt: skip
    parser.add_argument(
        "--runs", type=int,
        help="train this many seeds (--seed, --seed + 1, ...) after one compilation and "
        "report mean and spread",
    )  # fmt: skip
    parser.add_argument(
        "--host-devices", type=int,
        help="split the CPU into N devices (use with --parallel sharded); CPU only",
    )  # fmt: skip
    parser.add_argument(
        "--coordinator", help="multi-host: host:port of process 0 (or SGDJAX_COORDINATOR)"
    )
    parser.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, help="multi-host: this process's index")
    parser.add_argument("--no-progress", action="store_true",
                        help="hide progress bars (training and the data download)")  # fmt: skip
    add_config_flags(parser)
    return parser


def make_config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The preset's config with every given flag laid over it (checked by ``Config``)."""
    from sgdjax.training import PRESETS, Config, ConfigError

    given = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(Config)
        if getattr(args, field.name) is not None
    }
    try:
        return dataclasses.replace(PRESETS[args.preset], **given)
    except ConfigError as error:
        parser.error(f"{_flag(error.field)} {error.detail}")


def check_run_flags(config, args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """The flags that are not the config's, and --out (checked, nothing created)."""
    if args.runs is not None and args.runs <= 0:
        parser.error(f"--runs must be positive, got {args.runs}")
    if args.runs is not None and args.resume:
        parser.error("--resume continues one run; it cannot be combined with --runs")
    out = check_out(args.out, parser)
    from sgdjax.training import Checkpointer

    saved = Checkpointer.saved_steps(out / "checkpoints")
    if args.resume and not saved:
        parser.error(f"--resume: no checkpoints in {out / 'checkpoints'}")
    if not args.resume and saved:
        parser.error(
            f"--out {out} already holds checkpoints of a run: continue it with --resume, "
            "or choose another --out"
        )
    return out


def check_resume(config, dataset, out: Path, args, parser: argparse.ArgumentParser) -> None:
    """--resume must not report a longer run's result as this one's."""
    from sgdjax.training import Checkpointer, plan_run

    saved = Checkpointer.saved_steps(out / "checkpoints")
    if not args.resume or not saved:
        return
    available = len(dataset.train_images)
    train = available if config.train_subset is None else min(config.train_subset, available)
    total = plan_run(config, train).total_steps
    if max(saved) > total:
        parser.error(
            f"--resume: the newest checkpoint in {out / 'checkpoints'} is of step {max(saved)}, "
            f"past this run's last step {total} (--epochs {config.epochs}); its accuracy is not "
            f"a {config.epochs}-epoch result (raise --epochs or choose another --out)"
        )


def check_out(out: str, parser: argparse.ArgumentParser) -> Path:
    """Checks that ``out`` can be created and written, without creating anything."""
    if not out.strip():
        parser.error(f"--out must name a folder, got {out!r}")
    path = Path(out)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        parser.error(f"--out {path}: cannot write there ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"--out {path}: cannot write there ({existing} is not writable)")
    return path


def _device_flags(args) -> tuple[str, ...]:
    """The flags given that choose devices or a parallel mode (they win)."""
    names = ("host_devices", "parallel", "num_devices")
    return tuple(_flag(name) for name in names if getattr(args, name) is not None)


def arrange_devices(config, dataset, args):
    """The run's CPU arrangement when no flag chooses one (``sgdjax.parallel.arrange_cpu``,
    after ``split_cpu`` in ``main``), printed; the config to train with."""
    from sgdjax.parallel import arrange_cpu

    train = len(dataset.train_images)
    if config.train_subset is not None:
        train = min(config.train_subset, train)
    test = len(dataset.test_images)
    if config.test_subset is not None:
        test = min(config.test_subset, test)
    arrangement = arrange_cpu(
        batch_size=config.batch_size // config.accumulate,
        divides=(train, min(config.eval_batch_size, test)),
        explicit=_device_flags(args),
        processes=args.processes,
    )
    print(f"devices: {arrangement.reason}")
    if arrangement.parallel is None:
        return config
    return dataclasses.replace(
        config, parallel=arrangement.parallel, num_devices=arrangement.host_devices
    )


def load_data(args, parser):
    import jax

    from sgdjax import data

    try:  # several processes: each reads only the rows it places
        return data.load_cifar10(args.data_dir, progress=not args.no_progress,
                                 lazy=jax.process_count() > 1)  # fmt: skip
    except data.DataError as error:
        parser.error(str(error))


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.host_devices is not None:
        from sgdjax.parallel import use_cpu_devices

        try:
            use_cpu_devices(args.host_devices)
        except (ValueError, RuntimeError) as error:
            parser.error(f"--host-devices: {error}")
    from sgdjax.parallel import initialize_distributed

    try:
        distributed = initialize_distributed(args.coordinator, args.num_processes,
                                             args.process_id)  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    config = make_config(args, parser)
    import jax

    from sgdjax.parallel import split_cpu

    args.processes = jax.process_count() if distributed else 1
    split_cpu(batch_size=config.batch_size // config.accumulate,
              explicit=_device_flags(args), processes=args.processes)  # fmt: skip
    out = check_run_flags(config, args, parser)
    dataset = load_data(args, parser)
    config = arrange_devices(config, dataset, args)

    from sgdjax import training
    from sgdjax.parallel import ProcessMismatchError

    try:
        check_resume(config, dataset, out, args, parser)
        engine = training.Engine(config, dataset)
    except training.SetupError as error:
        parser.error(str(error))
    try:
        if args.runs is None:
            return engine.run(config.seed, out, resume=args.resume, progress=not args.no_progress,
                              accept_config_changes=args.accept_config_changes)  # fmt: skip
        report = engine.run_seeds(args.runs, out, progress=not args.no_progress)
    except training.Preempted as error:  # saved; a job script may requeue with --resume
        parser.exit(training.PREEMPTED_EXIT_STATUS, f"{parser.prog}: {error}\n")
    except (training.NonFiniteError, training.RunDirectoryLocked, training.ConfigChangedError,
            training.CheckpointError, ProcessMismatchError) as error:  # fmt: skip
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    spread = "" if args.runs == 1 else f" ± {100 * report['accuracy_std']:.2f}"
    time_spread = "" if args.runs == 1 else f" ± {report['seconds_std']:.2f}"
    print(
        f"{args.preset}: {args.runs} run(s), accuracy {100 * report['accuracy_mean']:.2f}%"
        f"{spread}, {report['seconds_mean']:.2f}{time_spread} s per run without compile, "
        f"{report['seconds_with_compile_mean']:.2f} s with compile "
        f"({report['compile_seconds']:.1f} s) on {report['device']}"
    )
    return report


if __name__ == "__main__":
    main()
