"""Train a next-character LSTM with sgdjax and report bits per character on held-out text.

    python experiments/charlm.py --out runs/charlm
    python experiments/charlm.py --corpus python_topics --out runs/charlm-offline

The classic recipe: SGD with momentum, the learning rate multiplied by 0.995
every step, gradients clipped by their global norm. The default text, Tiny
Shakespeare, is downloaded once (checked against its SHA-256) into --data-dir,
else $SGDJAX_DATA, else the user cache folder; ``--corpus python_topics`` needs
no network (the help topics that ship with CPython), ``--text-file`` reads any
UTF-8 file. Writes metrics.jsonl, summary.json, curves.png and checkpoints/
into --out; continue an interrupted run with --resume (the same batches follow).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A text to train on: fetched from ``urls`` and checked, or read offline."""

    description: str
    urls: tuple[str, ...] = ()
    sha256: str | None = None
    filename: str | None = None


CORPORA = {
    # Karpathy's char-rnn data set (1,115,394 bytes); the SHA-256 is the one
    # tensorflow-datasets publishes for this URL (tiny_shakespeare/checksums.tsv).
    "tiny_shakespeare": Corpus(
        description="Tiny Shakespeare (karpathy/char-rnn), downloaded once",
        urls=(
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
            "tinyshakespeare/input.txt",
        ),
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="tiny_shakespeare.txt",
    ),
    # Offline: the ~465,000 characters of help() topics in CPython's pydoc_data,
    # joined in sorted order (the same text for a given Python version).
    "python_topics": Corpus(description="CPython's pydoc help topics, no download"),
}


def _field(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class CharLMConfig:
    """Every hyperparameter of a run, checked when built (written into summary.json)."""

    corpus: str = _field("tiny_shakespeare", f"text to train on: one of {sorted(CORPORA)}")
    text_file: str | None = _field(None, "train on this UTF-8 file instead of --corpus")
    max_chars: int | None = _field(None, "use only the first N characters of the text")
    test_fraction: float = _field(0.1, "the last fraction of the text, held out for testing")
    embed_dim: int = _field(64, "size of the character embedding")
    hidden_size: int = _field(256, "LSTM units per layer")
    num_layers: int = _field(1, "stacked LSTM layers")
    seq_len: int = _field(100, "characters per training sequence (truncated backprop)")
    batch_size: int = _field(32, "sequences per step")
    steps: int = _field(1000, "training steps (at 0.995 per step the rate is 0.7% left)")
    learning_rate: float = _field(2.0, "initial SGD learning rate")
    decay: float = _field(0.995, "learning rate factor per step (exponential decay)")
    momentum: float = _field(0.9, "SGD momentum")
    nesterov: bool = _field(False, "Nesterov momentum")
    clip_norm: float | None = _field(5.0, "clip gradients by this global norm (none: no clip)")
    eval_every: int = _field(100, "steps between evaluations (a metrics.jsonl line each)")
    eval_batch_size: int = _field(256, "held-out sequences per evaluation batch")
    checkpoint_every: int = _field(500, "steps between checkpoints (and one at the end)")
    sample_length: int = _field(300, "characters to sample from the model at the end (0: none)")
    seed: int = _field(0, "seed of the initialization and of the batches")

    def __post_init__(self):
        if self.corpus not in CORPORA:
            raise ValueError(f"corpus must be one of {sorted(CORPORA)}, got {self.corpus!r}")
        positive = (
            "embed_dim", "hidden_size", "num_layers", "seq_len", "batch_size", "steps",
            "eval_every", "eval_batch_size", "checkpoint_every",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("sample_length", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.max_chars is not None and (
            isinstance(self.max_chars, bool) or not isinstance(self.max_chars, int)
            or self.max_chars <= 0
        ):  # fmt: skip
            raise ValueError(f"max_chars must be a positive integer, got {self.max_chars!r}")
        _check_range("test_fraction", self.test_fraction, "in (0, 1)", lambda v: 0 < v < 1)
        _check_range("learning_rate", self.learning_rate, "> 0", lambda v: v > 0)
        _check_range("decay", self.decay, "in (0, 1]", lambda v: 0 < v <= 1)
        _check_range("momentum", self.momentum, "in [0, 1)", lambda v: 0 <= v < 1)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0, got momentum 0")
        if self.clip_norm is not None:
            _check_range("clip_norm", self.clip_norm, "> 0", lambda v: v > 0)


def _check_range(name: str, value, wanted: str, holds) -> None:
    """Raises a ``ValueError`` naming ``name`` unless ``value`` is a finite real number
    for which ``holds(value)``."""
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and holds(value)):
        raise ValueError(f"{name} must be a finite number {wanted}, got {value!r}")


# ---------------------------------------------------------------- text


def load_text(
    config: CharLMConfig, data_dir: str | os.PathLike | None = None, *, progress: bool = True
) -> tuple[str, str]:
    """``(text, source)``: the configured text, cut to ``max_chars``, and where it came from."""
    if config.text_file is not None:
        text, source = Path(config.text_file).read_text(encoding="utf-8"), config.text_file
    elif config.corpus == "python_topics":
        from pydoc_data.topics import topics

        text, source = "\n".join(topics[name] for name in sorted(topics)), "pydoc_data.topics"
    else:
        from sgdjax.data import default_data_dir, fetch_file

        corpus = CORPORA[config.corpus]
        folder = Path(data_dir) if data_dir is not None else default_data_dir()
        path = fetch_file(
            list(corpus.urls), folder / corpus.filename, sha256=corpus.sha256, progress=progress
        )
        text, source = Path(path).read_text(encoding="utf-8"), corpus.urls[0]
    if config.max_chars is not None:
        text = text[: config.max_chars]
    return text, source


@dataclasses.dataclass(frozen=True)
class EncodedText:
    """The text as int32 character ids, split into a training head and a held-out tail."""

    vocabulary: str
    train: Any
    test: Any


def encode(text: str, config: CharLMConfig) -> EncodedText:
    """Ids over the sorted characters of the whole text; the last ``test_fraction`` held out."""
    import numpy as np

    vocabulary = "".join(sorted(set(text)))
    lookup = {character: index for index, character in enumerate(vocabulary)}
    ids = np.fromiter((lookup[c] for c in text), dtype=np.int32, count=len(text))
    split = int(round(len(ids) * (1.0 - config.test_fraction)))
    train, test = ids[:split], ids[split:]
    if len(train) <= config.seq_len or len(test) <= config.seq_len:
        raise ValueError(
            f"the text ({len(text)} characters) is too short for seq_len={config.seq_len}: "
            f"{len(train)} training and {len(test)} held-out characters, both must exceed it"
        )
    return EncodedText(vocabulary, train, test)


# ---------------------------------------------------------------- model


def make_model(config: CharLMConfig, vocab_size: int):
    """An embedding, ``num_layers`` LSTM layers and a dense read-out to next-character logits."""
    import flax.linen as nn

    class CharLSTM(nn.Module):
        vocab_size: int
        embed_dim: int
        hidden_size: int
        num_layers: int

        @nn.compact
        def __call__(self, tokens, train: bool = False, carries=None):
            """``tokens`` (batch, time) int32 -> logits (batch, time, vocab).

            With ``carries`` (one LSTM carry per layer) the call continues from them and
            returns ``(logits, carries)``: the sampler feeds one character at a time.
            """
            del train  # no dropout or batch statistics
            hidden = nn.Embed(self.vocab_size, self.embed_dim)(tokens)
            new_carries = []
            for layer in range(self.num_layers):
                rnn = nn.RNN(nn.OptimizedLSTMCell(self.hidden_size), return_carry=True)
                initial = None if carries is None else carries[layer]
                carry, hidden = rnn(hidden, initial_carry=initial)
                new_carries.append(carry)
            logits = nn.Dense(self.vocab_size)(hidden)
            return logits if carries is None else (logits, tuple(new_carries))

    return CharLSTM(vocab_size, config.embed_dim, config.hidden_size, config.num_layers)


def make_optimizer(config: CharLMConfig):
    """``(tx, schedule)``: clip by global norm, then SGD with momentum on a decaying rate."""
    import sgdjax
    from sgdjax import schedules

    schedule = schedules.exponential_decay(config.learning_rate, config.decay)
    sgd = sgdjax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov)
    if config.clip_norm is None:
        return sgd, schedule
    return sgdjax.chain(sgdjax.clip_by_global_norm(config.clip_norm), sgd), schedule


# ---------------------------------------------------------------- steps


def make_steps(config: CharLMConfig, schedule):
    """``(train_step, eval_step)``: jitted; the train step draws its own batch on the device.

    Batch ``t`` is ``batch_size`` windows of ``seq_len + 1`` characters at offsets drawn
    from ``fold_in(key(seed), t)``, so a resumed run sees the same batches.
    """
    import jax
    import jax.numpy as jnp

    from sgdjax.training import make_train_step

    step = make_train_step(
        preprocess_fn=lambda tokens: tokens, learning_rate_fn=schedule, jit=False
    )
    batch_key = jax.random.key(config.seed)
    window = config.seq_len + 1

    def train_step(state, train_ids):
        key = jax.random.fold_in(batch_key, state.step)
        starts = jax.random.randint(key, (config.batch_size,), 0, train_ids.shape[0] - window + 1)
        windows = jax.vmap(lambda start: jax.lax.dynamic_slice(train_ids, (start,), (window,)))(
            starts
        )
        return step(state, {"image": windows[:, :-1], "label": windows[:, 1:]})

    def eval_step(state, batch):
        logits = state.apply_fn({"params": state.params}, batch["image"])
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
        losses = -jnp.take_along_axis(log_probs, batch["label"][..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        mask = batch["mask"][:, None]
        return {
            "loss_sum": jnp.sum(losses * mask),
            "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask) * batch["label"].shape[1],
        }

    return jax.jit(train_step, donate_argnums=(0,)), jax.jit(eval_step)


def held_out_windows(test_ids, seq_len: int):
    """Consecutive, non-overlapping (inputs, targets) windows covering the held-out text."""
    count = (len(test_ids) - 1) // seq_len
    inputs = test_ids[: count * seq_len].reshape(count, seq_len)
    targets = test_ids[1 : count * seq_len + 1].reshape(count, seq_len)
    return inputs, targets


def evaluate_text(eval_step, state, inputs, targets, batch_size: int) -> dict[str, float]:
    """Mean loss and accuracy per character over all windows; the last batch padded, masked.

    (``sgdjax.training.evaluate`` pads one label per example; here each window has
    ``seq_len`` labels.) Every batch has the same shape, so the step compiles once.
    """
    import numpy as np

    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for start in range(0, len(inputs), batch_size):
        real = len(inputs[start : start + batch_size])
        rows = np.arange(start, start + batch_size) % len(inputs)  # padding repeats windows
        mask = (np.arange(batch_size) < real).astype(np.float32)
        sums = eval_step(state, {"image": inputs[rows], "label": targets[rows], "mask": mask})
        for key in totals:
            totals[key] += float(sums[key])
    return {
        "loss": totals["loss_sum"] / totals["count"],
        "accuracy": totals["correct"] / totals["count"],
    }


def sample(state, model, vocabulary: str, config: CharLMConfig, prompt: str) -> str:
    """``sample_length`` characters drawn from the model after ``prompt`` (temperature 1)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    if config.sample_length == 0:
        return ""
    lookup = {character: index for index, character in enumerate(vocabulary)}
    prompt_ids = jnp.asarray([[lookup[c] for c in prompt]], jnp.int32)

    @jax.jit
    def run(params, prompt_ids, key):
        zeros = tuple(
            (jnp.zeros((1, config.hidden_size)), jnp.zeros((1, config.hidden_size)))
            for _ in range(config.num_layers)
        )
        logits, carries = model.apply({"params": params}, prompt_ids, carries=zeros)

        def draw(carry, key):
            logits, carries = carry
            token = jax.random.categorical(key, logits[:, -1])
            logits, carries = model.apply({"params": params}, token[:, None], carries=carries)
            return (logits, carries), token[0]

        keys = jax.random.split(key, config.sample_length)
        _, tokens = jax.lax.scan(draw, (logits, carries), keys)
        return tokens

    tokens = np.asarray(run(state.params, prompt_ids, jax.random.key(config.seed + 1)))
    return "".join(vocabulary[int(token)] for token in tokens)


# ---------------------------------------------------------------- training


def train_and_evaluate(
    config: CharLMConfig,
    workdir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    text: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Trains the LSTM and writes metrics.jsonl, summary.json, curves.png and checkpoints/.

    Args:
      config: the run's hyperparameters.
      workdir: the output folder (made if needed).
      data_dir: where downloaded texts are kept (default:
        :func:`sgdjax.data.default_data_dir`).
      resume: continue from the newest good checkpoint in ``workdir``.
      progress: show progress bars.
      text: ``(text, source)`` already loaded by :func:`load_text`.

    Returns:
      The summary also written to ``summary.json``.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from sgdjax.training import (
        Checkpointer,
        TrainState,
        environment,
        plot_curves,
        write_json_atomic,
        write_jsonl_atomic,
    )

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    text, source = text if text is not None else load_text(config, data_dir, progress=progress)
    encoded = encode(text, config)
    vocab_size = len(encoded.vocabulary)
    model = make_model(config, vocab_size)
    tx, schedule = make_optimizer(config)
    create = jax.jit(  # one compiled program rather than one per initializer op
        lambda rng: TrainState.create(
            model=model, tx=tx, rng=rng, sample_input=jnp.zeros((1, config.seq_len), jnp.int32)
        )
    )
    state = create(jax.random.key(config.seed))
    train_step, eval_step = make_steps(config, schedule)
    test_inputs, test_targets = held_out_windows(encoded.test, config.seq_len)
    eval_batch_size = min(config.eval_batch_size, len(test_inputs))
    checkpoints = Checkpointer(workdir / "checkpoints")

    start_step = 0
    metrics_path = workdir / "metrics.jsonl"
    history: list[dict[str, Any]] = []
    if resume:
        # A changed config (other than the number of steps) raises ConfigChangedError.
        restored = checkpoints.restore_latest(
            state, config=dataclasses.asdict(config), ignore=("steps",)
        )
        if restored is not None:
            state, start_step, note, _ = restored
            print(note)
            if metrics_path.exists():
                history = [json.loads(line) for line in metrics_path.read_text().splitlines()]
                history = [row for row in history if row["step"] <= start_step]
    write_jsonl_atomic(metrics_path, history)

    train_ids = jax.device_put(encoded.train)
    characters_per_step = config.batch_size * config.seq_len
    compile_seconds = 0.0
    train_seconds = 0.0
    measured_steps = 0
    wall_start = time.perf_counter()
    pending: list[dict[str, jax.Array]] = []  # read once per evaluation, not every step
    interval_start = time.perf_counter()
    interval_measured = 0
    bar = tqdm(total=config.steps, initial=start_step, disable=not progress, leave=False)
    for step in range(start_step + 1, config.steps + 1):
        if step == start_step + 1:  # the first call traces and compiles
            tick = time.perf_counter()
            state, metrics = train_step(state, train_ids)
            jax.block_until_ready(metrics)
            compile_seconds = time.perf_counter() - tick
            interval_start = time.perf_counter()
        else:
            state, metrics = train_step(state, train_ids)
            interval_measured += 1
        pending.append(metrics)
        bar.update(1)
        if step % config.eval_every and step != config.steps:
            continue
        train = {name: float(np.mean([m[name] for m in pending])) for name in pending[0]}
        interval_seconds = time.perf_counter() - interval_start
        train_seconds += interval_seconds
        measured_steps += interval_measured
        test = evaluate_text(eval_step, state, test_inputs, test_targets, eval_batch_size)
        row = {
            "step": step,
            "epoch": step * characters_per_step / len(encoded.train),
            "train_loss": train["loss"],
            "train_bits_per_char": train["loss"] / math.log(2),
            "train_accuracy": train["accuracy"],
            "test_loss": test["loss"],
            "test_bits_per_char": test["loss"] / math.log(2),
            "test_accuracy": test["accuracy"],
            "learning_rate": float(pending[-1]["learning_rate"]),
            "grad_norm": float(pending[-1]["grad_norm"]),
            "characters_per_second": interval_measured
            * characters_per_step
            / max(interval_seconds, 1e-9),
        }
        history.append(row)
        write_jsonl_atomic(metrics_path, history)  # the whole file: a crash keeps the old one
        bar.write(
            f"step {step:5d}  train {row['train_bits_per_char']:.3f} bpc  "
            f"test {row['test_bits_per_char']:.3f} bpc  lr {row['learning_rate']:.4g}  "
            f"{row['characters_per_second']:.0f} chars/s"
        )
        pending, interval_measured = [], 0
        if step % config.checkpoint_every == 0 or step == config.steps:
            checkpoints.save(step, state, dataclasses.asdict(config))
        interval_start = time.perf_counter()
    bar.close()

    wall_seconds = time.perf_counter() - wall_start
    if history:
        plot_curves(history, workdir / "curves.png")
    final = history[-1] if history else {}
    generated = sample(state, model, encoded.vocabulary, config, prompt=text[:1])
    summary = {
        "test_bits_per_char": final.get("test_bits_per_char"),
        "test_loss": final.get("test_loss"),
        "test_accuracy": final.get("test_accuracy"),
        "steps": config.steps,
        "wall_seconds": wall_seconds,
        "compile_seconds": compile_seconds,
        "train_seconds_excluding_compile": train_seconds,
        "characters_per_second": measured_steps * characters_per_step / max(train_seconds, 1e-9),
        "text": {
            "source": source,
            "characters": len(text),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "train_characters": len(encoded.train),
            "test_characters": len(encoded.test),
            "vocabulary_size": vocab_size,
        },
        "sample": generated,
        "config": dataclasses.asdict(config),
        "environment": environment(),
    }
    write_json_atomic(workdir / "summary.json", summary)
    checkpoints.close()
    return summary


# ---------------------------------------------------------------- flags


_NONE = object()  # "--clip-norm none": the field set to None, not left at its default


def _float_or_none(value: str):
    return _NONE if value.lower() == "none" else float(value)


def build_parser() -> argparse.ArgumentParser:
    """One flag per config field (help text from the field), plus the run's options."""
    parser = argparse.ArgumentParser(
        description="Train a next-character LSTM with sgdjax.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for field in dataclasses.fields(CharLMConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata["help"]
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default: {field.default})")  # fmt: skip
            continue
        kind = {"int": int, "int | None": int, "float": float, "float | None": _float_or_none}.get(
            str(field.type), str
        )
        choices = sorted(CORPORA) if field.name == "corpus" else None
        parser.add_argument(flag, type=kind, choices=choices,
                            help=f"{help_text} (default: {field.default})")  # fmt: skip
    parser.add_argument("--data-dir", help="folder for downloaded texts "
                        "(default: $SGDJAX_DATA, else the user cache folder)")  # fmt: skip
    parser.add_argument("--out", default="runs/charlm", help="output directory")
    parser.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def parse_flags(
    argv: Sequence[str] | None = None,
) -> tuple[CharLMConfig, argparse.Namespace, argparse.ArgumentParser]:
    """The config the flags describe (a bad value exits with one line), the flags, the parser."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {
        field.name: None if getattr(args, field.name) is _NONE else getattr(args, field.name)
        for field in dataclasses.fields(CharLMConfig)
        if getattr(args, field.name) is not None
    }
    try:
        config = CharLMConfig(**given)
    except ValueError as error:
        parser.error(str(error))
    return config, args, parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config, args, parser = parse_flags(argv)
    from sgdjax.training import Checkpointer

    out = Path(args.out)
    if args.resume and not Checkpointer.saved_steps(out / "checkpoints"):
        parser.error(f"--resume: no checkpoints in {out / 'checkpoints'}")
    if not args.resume and Checkpointer.saved_steps(out / "checkpoints"):
        parser.error(
            f"--out {out} already holds checkpoints of a run: continue it with --resume, "
            "or choose another --out"
        )
    from sgdjax.data import DataError

    try:
        text = load_text(config, args.data_dir, progress=not args.no_progress)
        encode(text[0], config)
    except (DataError, OSError, UnicodeDecodeError, ValueError) as error:
        parser.error(str(error))
    from sgdjax.training import ConfigChangedError

    try:
        return train_and_evaluate(
            config, out, resume=args.resume, progress=not args.no_progress, text=text
        )
    except ConfigChangedError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main(sys.argv[1:])
