"""The XL (4B) DiTs: real configs, the official tensor table, the XL encoder differences, a tiny XL
checkpoint rendering through the Python API, and the diffusers layout round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from diffusers.pipelines.ace_step import AceStepConditionEncoder
from safetensors import safe_open

from acestep.checkpoints.convert import convert_to_diffusers
from acestep.checkpoints.demo import real_config, tiny_dit_config, write_demo_checkpoints
from acestep.checkpoints.loader import build_dit_modules, load_official_dit
from acestep.checkpoints.mapping import is_xl, unmap_name
from acestep.cli import main
from acestep.dit.xl import AceStepXLConditionEncoder
from acestep.handler import AceStepHandler
from acestep.inference import GenerationConfig, GenerationParams, generate_music
from tests.conftest import dit_handler
from tests.fixtures.upstream.xl_parity import deterministic_weights  # the rule that filled upstream's model

XL_VARIANTS = ("xl-turbo", "xl-sft", "xl-base")
XL_TABLE = Path(__file__).resolve().parents[2] / "acestep" / "checkpoints" / "acestep-v15-xl-turbo.params.tsv"
FRAME = 1920


@pytest.fixture(scope="module")
def xl_handler(xl_root):
    handler = dit_handler(xl_root, "xl-turbo")
    yield handler
    handler.loop.close()


@pytest.mark.parametrize("variant", XL_VARIANTS)
def test_xl_table_maps_onto_each_xl_config(variant, capsys):
    assert main(["verify-layout", str(XL_TABLE), "--config", f"acestep-v15-{variant}"]) == 0
    assert capsys.readouterr().out.strip() == "829/829 tensors mapped, shapes equal"


def test_xl_table_does_not_fit_the_2b_config(capsys):
    assert main(["verify-layout", str(XL_TABLE)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("677/829 tensors mapped; 152 unused checkpoint tensors: decoder.layers.24.")
    assert "shape mismatches" in out


def test_xl_configs_are_the_2b_ones_widened():
    two_b = real_config("acestep-v15-turbo")
    for variant in XL_VARIANTS:
        config = real_config(f"acestep-v15-{variant}")
        assert set(config) - set(two_b) == {"encoder_hidden_size", "encoder_intermediate_size",
                                            "encoder_num_attention_heads", "encoder_num_key_value_heads",
                                            "lyric_alignment_layers_config"}
        assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                config["num_attention_heads"], config["num_key_value_heads"]) == (2560, 9728, 32, 32, 8)
        assert (config["encoder_hidden_size"], config["encoder_intermediate_size"], config["encoder_num_attention_heads"],
                config["encoder_num_key_value_heads"]) == (2048, 6144, 16, 8)
        assert config["layer_types"] == ["sliding_attention", "full_attention"] * 16
        assert config["is_turbo"] is (variant == "xl-turbo") and is_xl(config)
    assert not any(is_xl(real_config(f"acestep-v15-{v}")) for v in ("turbo", "sft", "base"))


def test_xl_modules_keep_the_encoder_side_2048_wide():
    modules = build_dit_modules(real_config("acestep-v15-xl-turbo"), device="meta")
    assert isinstance(modules["condition_encoder"], AceStepXLConditionEncoder)
    assert modules["transformer"].condition_embedder.weight.shape == (2560, 2048)
    assert modules["transformer"].layers[0].self_attn.to_q.weight.shape == (4096, 2560)
    assert modules["condition_encoder"].lyric_encoder.layers[0].self_attn.to_q.weight.shape == (2048, 2048)
    assert modules["audio_tokenizer"].attention_pooler.embed_tokens.weight.shape == (2048, 2048)
    assert modules["audio_token_detokenizer"].proj_out.weight.shape == (64, 2048)
    total = sum(t.numel() for module in modules.values() for name, t in module.state_dict().items()
                if name != "silence_latent")
    assert total == 4_987_310_726  # the 829 tensors of the table


def test_tiny_xl_checkpoint_has_the_xl_layout(xl_root):
    folder = xl_root / "acestep-v15-xl-turbo"
    config = json.loads((folder / "config.json").read_text())
    assert set(config) == set(real_config("acestep-v15-xl-turbo"))
    assert config["encoder_hidden_size"] < config["hidden_size"]
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        assert "encoder.timbre_encoder.special_token" in handle.keys()
        assert handle.get_slice("decoder.condition_embedder.weight").get_shape() == [config["hidden_size"],
                                                                                     config["encoder_hidden_size"]]


def _timbre(encoder, frames):
    embs, mask = encoder.timbre_encoder(frames, torch.zeros(1, dtype=torch.long))
    return embs[0, 0], mask


def test_xl_timbre_encoder_pools_its_special_token(xl_root):
    """XL: the token is prepended and its output row pooled; the 2B class on the same weights pools
    the first frame and never reads the token."""
    xl = load_official_dit(xl_root / "acestep-v15-xl-turbo")["condition_encoder"]
    plain = AceStepConditionEncoder.from_config(xl.config)
    plain.load_state_dict(xl.state_dict())
    frames = torch.randn(1, 20, xl.config.timbre_hidden_dim, generator=torch.Generator().manual_seed(0))
    before_xl, mask = _timbre(xl, frames)
    before_plain, _ = _timbre(plain, frames)
    assert mask.tolist() == [[1]] and not torch.allclose(before_xl, before_plain)
    for encoder in (xl, plain):
        encoder.timbre_encoder.special_token.data.add_(1.0)
    assert not torch.allclose(_timbre(xl, frames)[0], before_xl)
    assert torch.equal(_timbre(plain, frames)[0], before_plain)


def _render(handler, tmp_path, **fields):
    config = GenerationConfig(use_random_seed=False, batch_size=1, seeds=[5], audio_format="wav")
    params = GenerationParams(thinking=False, caption="xl test tone", lyrics="[Verse]\nla la", **fields)
    result = generate_music(handler, None, params, config, save_dir=str(tmp_path))
    assert result.success, result.error
    data, rate = sf.read(result.audios[0]["path"], always_2d=True)
    assert rate == 48000 and data.shape[1] == 2 and abs(data).max() > 0
    return data


def test_xl_turbo_renders_every_task_it_serves(xl_handler, tmp_path, source_audio):
    assert xl_handler.is_turbo and type(xl_handler.bundle.condition_encoder) is AceStepXLConditionEncoder
    assert abs(_render(xl_handler, tmp_path, duration=10).shape[0] - 10 * 48000) <= FRAME
    cover = _render(xl_handler, tmp_path, task_type="cover", src_audio=source_audio, audio_cover_strength=0.5)
    assert abs(cover.shape[0] - 12 * 48000) <= FRAME
    nofsq = _render(xl_handler, tmp_path, task_type="cover-nofsq", src_audio=source_audio)
    assert abs(nofsq.shape[0] - 12 * 48000) <= FRAME
    repaint = _render(xl_handler, tmp_path, task_type="repaint", src_audio=source_audio, repainting_start=4.0,
                      repainting_end=8.0)
    source, _ = sf.read(source_audio, always_2d=True)
    before = slice(0, int(3.5 * 48000))
    assert np.corrcoef(repaint[before, 0], source[before, 0])[0, 1] > 0.999


def test_xl_converts_to_diffusers_and_renders_the_same(xl_root, xl_handler, tmp_path):
    repo = convert_to_diffusers(xl_root, "acestep-v15-xl-turbo", tmp_path / "xl-diffusers")
    saved = json.loads((repo / "condition_encoder" / "config.json").read_text())
    assert saved["_class_name"] == "AceStepXLConditionEncoder"
    assert json.loads((repo / "transformer" / "config.json").read_text())["encoder_hidden_size"] == saved["hidden_size"]
    converted = AceStepHandler()
    converted.initialize_service(None, str(repo), device="cpu")
    try:
        assert type(converted.bundle.condition_encoder) is AceStepXLConditionEncoder
        official = _render(xl_handler, tmp_path / "official", duration=10)
        assert (official == _render(converted, tmp_path / "converted", duration=10)).all()
    finally:
        converted.loop.close()



PARITY = Path(__file__).resolve().parents[1] / "fixtures" / "upstream" / "xl_parity.pt"


def _tiny_xl_modules(expected_config: dict) -> dict:
    config = tiny_dit_config("xl-turbo")
    assert {key: config[key] for key in expected_config} == expected_config
    modules = build_dit_modules(config, device="cpu")
    official = {unmap_name(component, inner): (component, inner) for component, module in modules.items()
                for inner in module.state_dict() if inner != "silence_latent"}
    weights = deterministic_weights({name: tuple(modules[c].state_dict()[i].shape)
                                      for name, (c, i) in official.items()})
    for name, (component, inner) in official.items():
        modules[component].get_parameter(inner).data.copy_(weights[name])
    return modules


@torch.no_grad()
def test_xl_modules_reproduce_upstreams_xl_model():
    """Condition encoder (with the timbre special token), DiT (wider than its encoder), tokenizer and
    detokenizer at encoder width: upstream's own outputs on the same weights and inputs, fp32."""
    expected = torch.load(PARITY, weights_only=True)
    x = expected["inputs"]
    modules = _tiny_xl_modules(json.loads(expected["config"]))
    enc, mask = modules["condition_encoder"](
        text_hidden_states=x["text"], text_attention_mask=x["text_mask"], lyric_hidden_states=x["lyric"],
        lyric_attention_mask=x["lyric_mask"], refer_audio_acoustic_hidden_states_packed=x["timbre"],
        refer_audio_order_mask=torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(enc, expected["encoder_states"], rtol=1e-5, atol=1e-6)
    assert torch.equal(mask.long(), expected["encoder_mask"].long())
    velocity = modules["transformer"](hidden_states=x["x_t"], timestep=x["t"], timestep_r=x["t"],
                                      encoder_hidden_states=enc, context_latents=x["context"], return_dict=False)[0]
    torch.testing.assert_close(velocity, expected["velocity"], rtol=1e-5, atol=1e-6)
    quantized, indices = modules["audio_tokenizer"].tokenize(x["latents"])
    assert torch.equal(indices.long(), expected["indices"].long())
    torch.testing.assert_close(modules["audio_token_detokenizer"](quantized), expected["hints"], rtol=1e-5, atol=1e-6)


def test_demo_checkpoints_command_writes_the_variants_asked_for(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo-checkpoints", str(tmp_path / "bad"), "--variants", "turbo,xl"])
    assert "variants=['xl']: expected some of turbo, base, sft, xl-turbo" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    root = write_demo_checkpoints(tmp_path / "sft", with_lm=False, variants=("xl-sft",))
    assert {p.name for p in root.iterdir()} == {"acestep-v15-xl-sft", "vae", "Qwen3-Embedding-0.6B"}
    config = json.loads((root / "acestep-v15-xl-sft" / "config.json").read_text())
    assert config["is_turbo"] is False and is_xl(config)
