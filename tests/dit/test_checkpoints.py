"""Checkpoint layout, strict name mapping and the demo checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from acestep.checkpoints.demo import real_config
from acestep.checkpoints.layout import resolve_dit_checkpoint
from acestep.checkpoints.loader import CheckpointMismatchError, load_official_dit
from acestep.checkpoints.mapping import map_official_name, unmap_name
from acestep.cli import main

PARAMS_TABLE = Path(__file__).resolve().parents[2] / "acestep" / "checkpoints" / "acestep-v15-turbo.params.tsv"


def test_verify_layout_maps_all_677(capsys):
    assert main(["verify-layout", str(PARAMS_TABLE)]) == 0
    assert capsys.readouterr().out.strip() == "677/677 tensors mapped, shapes equal"


def test_verify_layout_lists_mismatches(tmp_path, capsys):
    lines = PARAMS_TABLE.read_text().splitlines()
    lines[1] = lines[1].replace("1,2,2048", "1,2,1024")
    lines.append("decoder.extra_tensor.weight\t4\tBF16")
    table = tmp_path / "bad.tsv"
    table.write_text("\n".join(lines))
    assert main(["verify-layout", str(table)]) == 1
    out = capsys.readouterr().out
    assert "decoder.extra_tensor.weight" in out and "decoder.scale_shift_table" in out


def test_name_mapping_round_trips():
    names = [line.split("\t")[0] for line in PARAMS_TABLE.read_text().splitlines()]
    assert all(unmap_name(*map_official_name(n)) == n for n in names)
    assert map_official_name("decoder.proj_in.1.weight") == ("transformer", "proj_in_conv.weight")
    assert map_official_name("encoder.lyric_encoder.layers.3.self_attn.o_proj.weight") == (
        "condition_encoder", "lyric_encoder.layers.3.self_attn.to_out.0.weight")
    assert map_official_name("null_condition_emb") == ("condition_encoder", "null_condition_emb")


def test_demo_checkpoints_have_the_real_layout_and_keys(demo_root):
    for variant in ("turbo", "base"):
        folder = demo_root / f"acestep-v15-{variant}"
        assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "silence_latent.pt"}
        config = json.loads((folder / "config.json").read_text())
        assert set(config) == set(real_config(f"acestep-v15-{variant}"))
        assert config["is_turbo"] is (variant == "turbo")
        assert torch.load(folder / "silence_latent.pt", weights_only=True).shape == (1, 8, 15000)
    assert (demo_root / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert set(json.loads((demo_root / "vae" / "config.json").read_text())) >= set(real_config("vae"))
    assert (demo_root / "Qwen3-Embedding-0.6B" / "tokenizer.json").is_file()


def test_text_encoder_tokenizer_appends_endoftext(turbo_handler):
    tokenizer = turbo_handler.bundle.tokenizer
    ids = tokenizer("# Caption\nhello<|endoftext|>")["input_ids"]
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert ids[-2:] == [eot, eot]


def _copy_dit(demo_root, tmp_path):
    folder = tmp_path / "acestep-v15-turbo"
    shutil.copytree(demo_root / "acestep-v15-turbo", folder)
    return folder


def test_strict_loading_rejects_an_extra_tensor(demo_root, tmp_path):
    folder = _copy_dit(demo_root, tmp_path)
    state = load_file(folder / "model.safetensors")
    state["decoder.unexpected.weight"] = torch.zeros(3)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match="decoder.unexpected.weight"):
        load_official_dit(folder)


def test_strict_loading_rejects_missing_and_misshapen(demo_root, tmp_path):
    folder = _copy_dit(demo_root, tmp_path)
    state = load_file(folder / "model.safetensors")
    del state["decoder.norm_out.weight"]
    state["null_condition_emb"] = torch.zeros(1, 1, 7)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as info:
        load_official_dit(folder)
    assert "transformer.norm_out.weight" in str(info.value) and "null_condition_emb" in str(info.value)


def test_loading_keeps_the_checkpoint_dtype_unless_asked(demo_root, tmp_path):
    folder = _copy_dit(demo_root, tmp_path)
    state = {k: v.to(torch.bfloat16) for k, v in load_file(folder / "model.safetensors").items()}
    save_file(state, folder / "model.safetensors")
    modules = load_official_dit(folder)
    assert modules["transformer"].dtype == torch.bfloat16
    assert modules["condition_encoder"].silence_latent.dtype == torch.bfloat16
    assert load_official_dit(folder, dtype=torch.float32)["transformer"].dtype == torch.float32


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config_path='acestep-v15-nope'"):
        resolve_dit_checkpoint(tmp_path, "acestep-v15-nope")


# Qwen3 model cards: layers, query / KV heads, non-embedding parameters (billions, as rounded there),
# plus the planner LMs' vocabulary (Qwen3's tokens + 65,535 audio codes), tied embeddings.
QWEN3_CARDS = {"acestep-5Hz-lm-0.6B": (28, 16, 8, 0.44), "acestep-5Hz-lm-1.7B": (28, 16, 8, 1.4),
               "acestep-5Hz-lm-4B": (36, 32, 8, 3.6)}
LM_VOCAB = 217204
LM_1_7B_FILE_BYTES = 3_708_521_528  # model.safetensors of the 1.7B, bf16


def _lm_parameters(name: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = {k: v for k, v in real_config(name).items() if k not in ("architectures", "torch_dtype")}
    with torch.device("meta"):
        state = Qwen3ForCausalLM(Qwen3Config(**config)).state_dict()
    state.pop("lm_head.weight")  # tied to the embedding, not stored
    return {k: t.numel() for k, t in state.items()}


@pytest.mark.parametrize("name", sorted(QWEN3_CARDS))
def test_lm_configs_are_the_qwen3_models_with_the_audio_vocabulary(name):
    config = real_config(name)
    layers, heads, kv_heads, billions = QWEN3_CARDS[name]
    assert set(config) == set(real_config("acestep-5Hz-lm-1.7B"))
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (
        layers, heads, kv_heads)
    assert (config["head_dim"], config["vocab_size"], config["tie_word_embeddings"], config["rope_theta"],
            config["max_position_embeddings"], config["max_window_layers"]) == (128, LM_VOCAB, True, 1000000, 40960,
                                                                                layers)
    params = _lm_parameters(name)
    assert params["model.embed_tokens.weight"] == LM_VOCAB * config["hidden_size"]
    non_embedding = sum(n for k, n in params.items() if k != "model.embed_tokens.weight")
    assert float(f"{non_embedding / 1e9:.2g}") == billions
    if name == "acestep-5Hz-lm-1.7B":
        header = LM_1_7B_FILE_BYTES - 2 * sum(params.values())
        assert 0 < header < 64 * 1024


def test_the_stems_flag_of_a_config_reaches_the_transformer_config():
    """The SFT-stems checkpoint says ``is_lego_sft``; its lego prompt reads it from the loaded config."""
    from acestep.checkpoints.loader import build_dit_modules

    config = real_config("acestep-v15-sft")
    assert build_dit_modules(config)["transformer"].config.is_lego_sft is False
    assert build_dit_modules({**config, "is_lego_sft": True})["transformer"].config.is_lego_sft is True
