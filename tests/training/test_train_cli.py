"""``acestep train-lora``: bad input is refused with the field and its range, before Ray starts."""

from __future__ import annotations

import pytest

from acestep.cli import main


def test_train_lora_names_a_bad_value_and_a_missing_dataset_before_ray_starts(tmp_path, capsys):
    args = ["train-lora", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "run"), "--demo"]
    for extra, message in ((["--rank", "0"], "rank must be >= 1 (got 0)"),
                           (["--workers", "0"], "--workers must be >= 1 (got 0)"),
                           (["--scheduler", "step"], "argument --scheduler: invalid choice: 'step'")):
        with pytest.raises(SystemExit) as exit_:
            main(args + extra)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert main(args) == 2
    assert "no prepared samples" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before demo checkpoints, Ray storage or anything else
