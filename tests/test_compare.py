"""compare.py's ASGD, Muon and SWA entries, end to end on a tiny image folder."""

import json

import numpy as np
import pytest
from helpers import load_script

compare = load_script("compare")


def test_asgd_muon_and_swa_run_end_to_end(image_folder, tmp_path):
    argv = [
        "--data-dir", str(image_folder), "--out", str(tmp_path), "--optimizers", "asgd", "muon",
        "swa", "--epochs", "5", "--batch-size", "16", "--no-progress",
    ]  # fmt: skip
    result = compare.main(argv)
    assert list(result["runs"]) == ["asgd", "muon", "swa"]
    for name, by_seed in result["runs"].items():
        run = by_seed[0]
        config, history = run["config"], run["history"]
        for field, value in compare.OPTIMIZERS[name].items():
            assert config[field] == value, (name, field)
        assert [row["step"] for row in history] == [5, 10, 15, 20, 25]  # 80 images, batch 16
        assert all(np.isfinite(row["train_loss"]) for row in history)
        assert run["test_accuracy"] == history[-1]["test_accuracy"]
    # SWA: the schedule for ceil(0.6 x 5) = 3 epochs, SWALR's one-epoch anneal in epoch 4,
    # swa_lr held through epoch 5.
    swa = result["runs"]["swa"][0]
    assert swa["history"][-1]["learning_rate"] == pytest.approx(swa["config"]["swa_lr"])
    table = (tmp_path / "compare.md").read_text().splitlines()
    assert len(table) == 2 + 3 and {line.split("|")[1].strip() for line in table[2:]} == {
        "asgd", "muon", "swa"
    }  # fmt: skip
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["summary"]["muon"]["seeds"] == [0]


def test_summary_of_one_seed_has_no_spread_and_is_strict_json():
    runs = {
        "one": {2: {"test_accuracy": 0.72, "wall_seconds": 10.0}},
        "two": {0: {"test_accuracy": 0.70, "wall_seconds": 4.0},
                1: {"test_accuracy": 0.74, "wall_seconds": 6.0}},
    }  # fmt: skip
    table = compare.summarize(runs)
    assert table["one"]["std"] is None
    assert table["two"]["std"] == pytest.approx(np.std([0.70, 0.74], ddof=1))
    assert table["two"]["wall_seconds"] == pytest.approx(5.0)
    json.dumps(table, allow_nan=False)  # NaN is not JSON
    rows = compare.markdown_table(table, epochs=5).splitlines()[2:]
    assert "| 72.00 |" in rows[0] and "±" not in rows[0]
    assert "| 72.00 ± 2.83 |" in rows[1]
