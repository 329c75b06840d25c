"""compare.py --full-batch: gradient descent on the whole subset beside minibatch SGD."""

import json

import pytest
from helpers import load_script

compare = load_script("compare")


def test_the_three_runs_and_their_table(image_folder, tmp_path):
    argv = [
        "--data-dir", str(image_folder), "--out", str(tmp_path), "--full-batch",
        "--train-subset", "32", "--batch-size", "8", "--epochs", "2", "--no-progress",
    ]  # fmt: skip
    result = compare.main(argv)
    runs = {name: by_seed[0] for name, by_seed in result["runs"].items()}
    assert list(runs) == ["minibatch", "full_batch_epochs", "full_batch_steps"]
    # 2 epochs of 32 images in batches of 8 are 8 steps; the whole subset per step:
    # 2 steps at the same epochs, 8 steps (8 epochs) at the same gradient evaluations.
    expected = {"minibatch": (8, 8, 2), "full_batch_epochs": (32, 2, 2),
                "full_batch_steps": (32, 8, 8)}  # fmt: skip
    for name, (batch_size, steps, epochs) in expected.items():
        config, history = runs[name]["config"], runs[name]["history"]
        assert (config["batch_size"], history[-1]["step"], len(history)) == (
            batch_size, steps, epochs
        )  # fmt: skip
        assert (config["flip"], config["crop_padding"], config["translate"]) == ("none", 0, 0)
        assert config["optimizer"] == "sgd" and config["learning_rate"] == 0.05  # the preset's
    # Full-batch evaluation falls at the minibatch run's epoch ends (steps 4 and 8).
    history = runs["full_batch_steps"]["history"]
    assert [r["step"] for r in history if r["test_accuracy"] is not None] == [4, 8]
    # The first full-batch step of both full-batch runs is the same step: same initial
    # weights, same whole batch (its order does not matter), so the same first loss.
    first = runs["full_batch_epochs"]["history"][0]["train_loss"]
    assert runs["full_batch_steps"]["history"][0]["train_loss"] == pytest.approx(first, rel=1e-6)
    assert runs["minibatch"]["history"][0]["train_loss"] != pytest.approx(first, rel=1e-6)

    table = (tmp_path / "compare.md").read_text().splitlines()
    assert len(table) == 2 + 3 and all(line.count("|") == 9 for line in table)
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in table[2:]}
    examples = {name: int(cells[2]) for name, cells in rows.items()}
    assert examples == {"minibatch": 64, "full_batch_epochs": 64, "full_batch_steps": 256}
    assert (tmp_path / "compare.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert set(saved["runs"]) == set(expected)


def test_one_learning_rate_and_schedule_for_every_run(image_folder, tmp_path):
    argv = [
        "--data-dir", str(image_folder), "--out", str(tmp_path), "--full-batch",
        "--train-subset", "16", "--batch-size", "8", "--epochs", "1", "--no-progress",
        "--learning-rate", "0.01", "--schedule", "constant",
    ]  # fmt: skip
    result = compare.main(argv)
    assert list(result["runs"]) == ["minibatch", "full_batch_epochs", "full_batch_steps"]
    for by_seed in result["runs"].values():
        config, history = by_seed[0]["config"], by_seed[0]["history"]
        assert (config["learning_rate"], config["schedule"]) == (0.01, "constant")
        assert [row["learning_rate"] for row in history] == pytest.approx([0.01] * len(history))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train-subset", "32", "--optimizers", "adam"], "drop --optimizers"),
        ([], "needs --train-subset"),
        (["--train-subset", "4", "--batch-size", "8"], "smaller than the batch size"),
        (["--train-subset", "32", "--batch-size", "8", "--schedule", "linear"], "one of constant"),
        (["--train-subset", "32", "--batch-size", "8", "--learning-rate", "-1"], "learning_rate"),
    ],
)
def test_bad_combinations_exit_with_one_line(image_folder, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--data-dir", str(image_folder), "--out", str(tmp_path), "--full-batch",
                      *extra])  # fmt: skip
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
