"""The in-process CLI: `acestep generate` writes files and reports seeds."""

from __future__ import annotations

import soundfile as sf

from acestep.cli import main


def test_generate_command_writes_audio(demo_root, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["generate", "--checkpoints", str(demo_root), "--caption", "cli tone", "--duration", "10",
                 "--seed", "3", "--format", "wav", "--out", str(out), "--device", "cpu"])
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    path, seed, key = line.split("\t")
    assert seed == "seed=3" and path.endswith(".wav") and key.split("=")[1] in path
    data, rate = sf.read(path)
    assert rate == 48000 and data.shape[1] == 2


def test_generate_command_rejects_bad_input(demo_root, tmp_path, capsys):
    code = main(["generate", "--checkpoints", str(demo_root), "--duration", "5", "--out", str(tmp_path)])
    assert code == 2
    assert "duration" in capsys.readouterr().err


def test_generate_command_shows_lm_progress(demo_root, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["generate", "--checkpoints", str(demo_root), "--lm", "acestep-5Hz-lm-0.6B", "--caption", "cli song",
                 "--duration", "10", "--seed", "4", "--out", str(out), "--device", "cpu"])
    assert code == 0
    err = capsys.readouterr().err
    assert "LM codes" in err and "51/51 tokens" in err  # the LM bar reached its 50 codes + stop
    assert "diffusion" in err or "step" in err.lower()
