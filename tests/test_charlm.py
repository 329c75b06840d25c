"""experiments/charlm.py end to end on a tiny generated text."""

import dataclasses
import hashlib
import json
import math

import jax
import numpy as np
import pytest
from helpers import load_script

from sgdjax.training import Checkpointer

charlm = load_script("charlm")

# A tiny model and a handful of steps: the whole file runs in seconds.
TINY = [
    "--embed-dim", "8", "--hidden-size", "16", "--seq-len", "12", "--batch-size", "4",
    "--eval-every", "3", "--checkpoint-every", "3", "--sample-length", "20", "--no-progress",
    "--learning-rate", "0.5",
]  # fmt: skip


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A few hundred characters of a repeating, learnable pattern with some noise."""
    rng = np.random.default_rng(0)
    words = ["the ", "cat ", "sat ", "on ", "a ", "mat.\n"]
    text = "".join(words[i % len(words)] if rng.random() > 0.1 else "x " for i in range(150))
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(text, encoding="utf-8")
    return path


def _run(text_file, out, *extra):
    return charlm.main(["--text-file", str(text_file), "--out", str(out), *TINY, *extra])


@pytest.fixture(scope="module")
def runs(text_file, tmp_path_factory):
    """Six steps straight, and three steps then three more resumed from the checkpoint."""
    root = tmp_path_factory.mktemp("runs")
    straight = _run(text_file, root / "straight", "--steps", "6")
    _run(text_file, root / "split", "--steps", "3")
    resumed = _run(text_file, root / "split", "--steps", "6", "--resume")
    return {"straight": (straight, root / "straight"), "resumed": (resumed, root / "split")}


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_short_run_writes_every_output_and_learns(text_file, runs):
    summary, out = runs["straight"]
    rows = _rows(out)
    assert [row["step"] for row in rows] == [3, 6]
    for row in rows:
        assert math.isclose(row["test_bits_per_char"], row["test_loss"] / math.log(2))
        assert math.isclose(row["train_bits_per_char"], row["train_loss"] / math.log(2))
        assert row["characters_per_second"] > 0
    # The rate reported at step 6 is the one step 6 used (count 5): 0.5 * 0.995 ** 5.
    assert rows[-1]["learning_rate"] == pytest.approx(0.5 * 0.995**5, rel=1e-6)
    vocabulary = sorted(set(text_file.read_text()))
    # Untrained, the model is near uniform: about log2(V) bits per character; it must improve.
    assert rows[-1]["test_bits_per_char"] < math.log2(len(vocabulary)) - 0.3
    assert summary["test_bits_per_char"] == rows[-1]["test_bits_per_char"]
    assert summary["text"]["vocabulary_size"] == len(vocabulary)
    assert summary["text"]["source"] == str(text_file)
    assert len(summary["sample"]) == 20 and set(summary["sample"]) <= set(vocabulary)
    assert summary["environment"]["platform"] == jax.devices()[0].platform
    assert summary["config"]["decay"] == 0.995 and summary["config"]["momentum"] == 0.9
    assert summary["compile_seconds"] > 0 and summary["train_seconds_excluding_compile"] > 0
    assert (out / "curves.png").stat().st_size > 0
    assert Checkpointer.saved_steps(out / "checkpoints") == [3, 6]


def test_resume_continues_with_the_same_batches(runs):
    (straight, straight_out), (resumed, resumed_out) = runs["straight"], runs["resumed"]
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], rel=1e-6)
    assert resumed["sample"] == straight["sample"]
    for a, b in zip(_rows(straight_out), _rows(resumed_out), strict=True):
        assert a["step"] == b["step"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-6)


def test_an_existing_run_needs_resume_with_the_same_config(text_file, runs, capsys):
    with pytest.raises(SystemExit):
        _run(text_file, runs["straight"][1], "--steps", "3")
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(text_file, runs["straight"][1], "--steps", "9", "--resume", "--momentum", "0.5")
    assert "momentum" in capsys.readouterr().err


def test_held_out_windows_cover_the_tail_once():
    ids = np.arange(23, dtype=np.int32)
    inputs, targets = charlm.held_out_windows(ids, 5)
    assert inputs.shape == targets.shape == (4, 5)
    np.testing.assert_array_equal(inputs.ravel(), ids[:20])
    np.testing.assert_array_equal(targets.ravel(), ids[1:21])


def test_evaluation_equals_a_numpy_reference(text_file):
    config = charlm.CharLMConfig(text_file=str(text_file), embed_dim=4, hidden_size=8, seq_len=7)
    encoded = charlm.encode(text_file.read_text(), config)
    model = charlm.make_model(config, len(encoded.vocabulary))
    tx, schedule = charlm.make_optimizer(config)
    from sgdjax.training import TrainState

    state = TrainState.create(
        model=model, tx=tx, rng=jax.random.key(1), sample_input=np.zeros((1, 7), np.int32)
    )
    _, eval_step = charlm.make_steps(config, schedule)
    inputs, targets = charlm.held_out_windows(encoded.test, config.seq_len)
    assert len(inputs) % 3  # the last batch is padded
    got = charlm.evaluate_text(eval_step, state, inputs, targets, batch_size=3)
    logits = np.asarray(model.apply({"params": state.params}, inputs), np.float64)
    log_probs = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)
    assert got["loss"] == pytest.approx(-picked.mean(), rel=1e-5)
    assert got["accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == targets))


def test_the_offline_corpus_is_cpython_help_text():
    config = charlm.CharLMConfig(corpus="python_topics", max_chars=5000)
    text, source = charlm.load_text(config)
    assert source == "pydoc_data.topics" and len(text) == 5000
    assert "statement" in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "0"], "steps must be a positive integer"),
        (["--decay", "1.5"], "decay"),
        (["--momentum", "1.0"], "momentum"),
        (["--learning-rate", "0"], "learning_rate"),
        (["--clip-norm", "-1"], "clip_norm"),
        (["--test-fraction", "1"], "test_fraction"),
        (["--nesterov", "--momentum", "0"], "nesterov"),
        (["--seq-len", "500"], "too short for seq_len=500"),
    ],
)
def test_bad_flags_exit_with_one_line(text_file, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        _run(text_file, tmp_path / "o", *extra)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_text_file_and_unknown_corpus_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        charlm.main(["--text-file", str(tmp_path / "absent.txt"), "--out", str(tmp_path / "o")])
    assert "absent.txt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="corpus"):
        charlm.CharLMConfig(corpus="war_and_peace")


def test_clip_norm_none_turns_clipping_off():
    config, _, _ = charlm.parse_flags(["--clip-norm", "none"])
    assert config.clip_norm is None
    assert charlm.parse_flags(["--clip-norm", "2.5"])[0].clip_norm == 2.5
    grads = {"w": np.asarray([300.0, 400.0], np.float32)}  # global norm 500
    for clip_norm, expected in ((None, [-150.0, -200.0]), (5.0, [-1.5, -2.0])):
        # First step: update = -lr * clipped gradient, lr 0.5, no momentum buffer yet.
        tx, _ = charlm.make_optimizer(charlm.CharLMConfig(clip_norm=clip_norm, learning_rate=0.5))
        params = {"w": np.zeros(2, np.float32)}
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)


def test_the_corpus_is_fetched_once_and_checked(text_file, tmp_path, monkeypatch, capsys):
    source = tmp_path / "served.txt"
    source.write_bytes(text_file.read_bytes())
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    corpus = charlm.Corpus("a test text", urls=(source.as_uri(),), sha256=digest, filename="t.txt")
    monkeypatch.setitem(charlm.CORPORA, "tiny_shakespeare", corpus)
    config = charlm.CharLMConfig(corpus="tiny_shakespeare")
    text, where = charlm.load_text(config, tmp_path / "cache", progress=False)
    assert text == text_file.read_text() and where == source.as_uri()
    assert (tmp_path / "cache" / "t.txt").read_bytes() == source.read_bytes()
    source.unlink()  # the cached copy is used, nothing is fetched again
    assert charlm.load_text(config, tmp_path / "cache", progress=False)[0] == text
    monkeypatch.setenv("SGDJAX_DATA", str(tmp_path / "cache"))
    assert charlm.load_text(config, progress=False)[0] == text

    wrong = dataclasses.replace(corpus, filename="other.txt", sha256="0" * 64)
    monkeypatch.setitem(charlm.CORPORA, "tiny_shakespeare", wrong)
    source.write_text("not the text")
    with pytest.raises(SystemExit) as exit_info:
        charlm.main(["--data-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "sha256" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "other.txt").exists()
