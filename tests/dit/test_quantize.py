"""Weight-only quantization (``acestep.quantize``) on the real demo modules: a quantized DiT renders
every task the demo turbo and base serve, close to the full-precision render; the quantized weights
are what stays resident (about half their bf16 bytes); the quantized LM still plans; bad values are
refused naming ``quantization``.

Closeness measure: the SNR of the final latents, 20·log10(‖ref‖ / ‖quantized − ref‖), against the
unquantized handler's latents for the same request and seed. int8 weights with per-row scales put
every demo render at 52-55 dB; the bound, 30 dB (relative L2 error <= 3.2 %), leaves room for other
seeds and thread counts and still fails for a wrong layer, a wrong scale or a dropped term."""

from __future__ import annotations

import gc
import weakref

import pytest
import soundfile as sf
import torch
from torch import nn

from acestep.checkpoints.bundle import load_dit_bundle
from acestep.checkpoints.demo import real_config
from acestep.checkpoints.demo_lm import DEMO_LM_DIRNAME
from acestep.checkpoints.layout import resolve_dit_checkpoint
from acestep.checkpoints.loader import build_dit_modules
from acestep.dit.adapters import AdapterError
from acestep.dit.codes import format_audio_codes
from acestep.handler import AceStepHandler
from acestep.inference import GenerationConfig, GenerationParams, generate_music
from tests.conftest import write_tone
from acestep.quantize import QUANTIZATION_MODES, check_quantization, is_quantized, quantize_modules, weight_bytes

MIN_SNR_DB = 30.0
FP8_MIN_SNR_DB = 20.0  # e4m3 keeps 3 mantissa bits (up to 6 % per weight): coarser than int8
BF16_RATIO = 0.55  # int8 / fp8 weights are half the bf16 bytes; per-row scales add a little
INT8 = "int8_weight_only"

TURBO_TASKS = {
    "text2music": dict(duration=10),
    "cover": dict(task_type="cover", src="source", audio_cover_strength=0.5),
    "cover-codes": dict(task_type="cover", audio_codes=format_audio_codes([(i * 997) % 64000 for i in range(50)])),
    "cover-nofsq": dict(task_type="cover-nofsq", src="source"),
    "repaint": dict(task_type="repaint", src="source", repainting_start=1.0, repainting_end=3.0),
}
BASE_TASKS = {
    "text2music": dict(duration=10),
    "lego": dict(task_type="lego", src="source", instruction="Generate the GUITAR track based on the audio context:"),
    "extract": dict(task_type="extract", src="source", instruction="Extract the VOCALS track from the audio:"),
    "complete": dict(task_type="complete", src="source",
                     instruction="Complete the input track with drums, bass, guitar:"),
}


def _quantized(demo_root, variant: str, mode: str = INT8) -> AceStepHandler:
    handler = AceStepHandler()
    handler.initialize_service(str(demo_root), f"acestep-v15-{variant}", device="cpu", quantization=mode)
    return handler


@pytest.fixture(scope="module")
def short_source(tmp_path_factory):
    """4 s stereo tone: the source-audio tasks spend their CPU time in the VAE, so keep it short."""
    return write_tone(tmp_path_factory.mktemp("audio") / "short.wav", 4.0)


@pytest.fixture(scope="module")
def audio(short_source):
    return {"source": short_source}


@pytest.fixture(scope="module")
def turbo_int8(demo_root):
    handler = _quantized(demo_root, "turbo")
    yield handler
    handler.loop.close()


@pytest.fixture(scope="module")
def base_int8(demo_root):
    handler = _quantized(demo_root, "base")
    yield handler
    handler.loop.close()


def _render(handler, tmp_path, fields, audio):
    fields = dict(fields)
    if "src" in fields:
        fields["src_audio"] = audio[fields.pop("src")]
    if handler.family == "base":
        fields.update(inference_steps=4, guidance_scale=3.0)
    params = GenerationParams(thinking=False, caption="warm test tone", lyrics="[Verse]\nla la", **fields)
    config = GenerationConfig(use_random_seed=False, batch_size=1, seeds=[7], audio_format="wav")
    result = generate_music(handler, None, params, config, save_dir=str(tmp_path))
    assert result.success, result.error
    data, rate = sf.read(result.audios[0]["path"], always_2d=True)
    assert rate == 48000 and data.shape[1] == 2 and data.shape[0] > 48000
    return result.extra_outputs["latents"].float()


def snr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    error = (other - reference).norm()
    return float("inf") if error == 0 else float(20 * torch.log10(reference.norm() / error))


@pytest.mark.parametrize("task", list(TURBO_TASKS))
def test_quantized_turbo_renders_each_task_close_to_full_precision(turbo_handler, turbo_int8, tmp_path, task, audio):
    full = _render(turbo_handler, tmp_path / "full", TURBO_TASKS[task], audio)
    quantized = _render(turbo_int8, tmp_path / "int8", TURBO_TASKS[task], audio)
    assert quantized.shape == full.shape
    assert not torch.equal(quantized, full)  # the quantized weights did run
    assert snr_db(full, quantized) >= MIN_SNR_DB


@pytest.mark.parametrize("task", list(BASE_TASKS))
def test_quantized_base_renders_each_task_close_to_full_precision(base_handler, base_int8, tmp_path, task, audio):
    full = _render(base_handler, tmp_path / "full", BASE_TASKS[task], audio)
    quantized = _render(base_int8, tmp_path / "int8", BASE_TASKS[task], audio)
    assert not torch.equal(quantized, full)
    assert snr_db(full, quantized) >= MIN_SNR_DB


def test_dynamic_int8_activations_render_close_to_full_precision(demo_root, turbo_handler, tmp_path, audio):
    handler = _quantized(demo_root, "turbo", "w8a8_dynamic")
    try:
        full = _render(turbo_handler, tmp_path / "full", TURBO_TASKS["text2music"], audio)
        quantized = _render(handler, tmp_path / "w8a8", TURBO_TASKS["text2music"], audio)
    finally:
        handler.loop.close()
    assert snr_db(full, quantized) >= MIN_SNR_DB


def test_only_the_quantized_weights_stay_resident(demo_root):
    bundle = load_dit_bundle(resolve_dit_checkpoint(str(demo_root), "acestep-v15-turbo"), device="cpu")
    linears = [m for m in bundle.transformer.modules() if isinstance(m, nn.Linear)]
    originals = [weakref.ref(m.weight) for m in linears]
    before = weight_bytes(bundle.transformer)
    assert quantize_modules(bundle.transformer, INT8) == len(linears) == before.linear_layers > 0
    gc.collect()
    assert all(ref() is None for ref in originals)  # no full-precision copy kept anywhere
    after = weight_bytes(bundle.transformer)
    assert after.quantized_layers == after.linear_layers == len(linears)
    assert all(m.weight.qdata.dtype == torch.int8 for m in linears)
    assert after.linear < before.linear / 3  # the demo loads in fp32: int8 is a quarter, plus scales
    # 32-wide demo rows carry their per-row scale over only 64 bf16 bytes; full-size rows below
    assert after.ratio_to_bf16 <= 0.6
    # the encoders, tokenizer and VAE stay as loaded
    assert not any(is_quantized(p) for p in bundle.condition_encoder.parameters())


@pytest.mark.parametrize("variant", ["turbo", "xl-turbo"])
def test_full_size_dit_linear_weights_take_at_most_055_of_bf16(variant):
    """The real 2B and XL transformers, built and quantized on the meta device (shapes only)."""
    transformer = build_dit_modules(real_config(f"acestep-v15-{variant}"), device="meta")["transformer"]
    transformer.to(torch.bfloat16)
    quantize_modules(transformer, INT8)
    report = weight_bytes(transformer)
    assert report.linear_bf16 > 2 * 10**9  # over a billion Linear weights: the bulk of the model
    assert report.quantized_layers == report.linear_layers
    assert report.ratio_to_bf16 <= BF16_RATIO


@pytest.mark.parametrize("mode", ["int8_weight_only", "w8a8_dynamic"])
@torch.no_grad()
def test_random_module_quantizes_to_about_half_of_bf16_and_stays_close(mode):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512)).to(torch.bfloat16).eval()
    x = torch.randn(4, 25, 512, dtype=torch.bfloat16)
    full = module(x).float()
    assert weight_bytes(module).ratio_to_bf16 == 1.0
    assert quantize_modules(module, mode) == 2
    assert weight_bytes(module).ratio_to_bf16 <= BF16_RATIO
    assert snr_db(full, module(x).float()) >= MIN_SNR_DB
    assert quantize_modules(module, mode) == 0  # already quantized layers are left alone


def test_bad_quantization_values_are_refused_naming_the_field(demo_root):
    with pytest.raises(ValueError, match=r"quantization='int4'.*int8_weight_only.*fp8_weight_only"):
        AceStepHandler().initialize_service(str(demo_root), "acestep-v15-turbo", device="cpu", quantization="int4")
    with pytest.raises(ValueError, match=r"quantization='fp8_weight_only'.*capability >= 8\.9.*cpu"):
        AceStepHandler().initialize_service(str(demo_root), "acestep-v15-turbo", device="cpu",
                                            quantization="fp8_weight_only")
    with pytest.raises(ValueError, match=r"quantization='fp8_weight_only'.*cpu"):
        quantize_modules(nn.Linear(16, 16), "fp8_weight_only")
    with pytest.raises(ValueError, match="quantization"):
        quantize_modules(nn.Linear(16, 16), "INT8")
    assert check_quantization(None) is None and quantize_modules(nn.Linear(4, 4), None) == 0
    assert set(QUANTIZATION_MODES) == {"int8_weight_only", "fp8_weight_only", "w8a8_dynamic"}


def test_adapters_run_on_a_quantized_dit_and_fusing_is_refused(demo_root, turbo_int8, tmp_path):
    from acestep.checkpoints.demo_lora import write_demo_lora

    adapter = write_demo_lora(tmp_path / "lora")
    info = turbo_int8.load_lora(str(adapter), "quantized_lora")
    try:
        assert info.rank == 4
        params = GenerationParams(thinking=False, caption="x", duration=10)
        config = GenerationConfig(use_random_seed=False, batch_size=1, seeds=[3])
        with_adapter = generate_music(turbo_int8, None, params, config, save_dir=str(tmp_path))
        turbo_int8.set_use_lora(False)
        without = generate_music(turbo_int8, None, params, config, save_dir=str(tmp_path))
        assert with_adapter.success and without.success
        assert not torch.equal(with_adapter.extra_outputs["latents"], without.extra_outputs["latents"])
        turbo_int8.set_use_lora(True)
        with pytest.raises(AdapterError, match="quantization='int8_weight_only'"):
            turbo_int8.fuse_lora()
    finally:
        turbo_int8.unload_lora("quantized_lora")


def test_quantized_lm_still_plans_codes(demo_root):
    from acestep.lm.parsing import count_codes
    from acestep.llm_inference import LLMHandler

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small-batch decoding on a shared 2-core box
    handler = LLMHandler()
    try:
        handler.initialize(str(demo_root), DEMO_LM_DIRNAME, device="cpu", quantization=INT8)
        model = handler.llm.model
        report = weight_bytes(model.model)
        assert report.quantized_layers == report.linear_layers > 0
        assert model.lm_head.weight is model.model.embed_tokens.weight  # the tied head stays one tensor
        params = GenerationParams(caption="rock", bpm=100, keyscale="E minor", timesignature="4", duration=10)
        plan, = handler.plan(params, GenerationConfig(batch_size=1), [1])
        assert count_codes(plan.audio_codes) == 50
    finally:
        handler.unload()
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="quantization='int4'"):
        LLMHandler().initialize(str(demo_root), DEMO_LM_DIRNAME, device="cpu", quantization="int4")


def test_serve_config_names_the_quantization_keys(demo_root):
    pydantic = pytest.importorskip("pydantic")
    from serve.config import AppConfig

    for key in ("dit", "lm"):
        with pytest.raises(pydantic.ValidationError, match=rf"{key}\.quantization[\s\S]*'int8_weight_only', "
                                                           r"'fp8_weight_only' or 'w8a8_dynamic'"):
            AppConfig.model_validate({"demo": True, key: {"quantization": "int4"}})
    config = AppConfig.model_validate({"checkpoints": str(demo_root), "dit": {"quantization": INT8, "device": "cpu"},
                                       "lm": {"quantization": "w8a8_dynamic"}})
    assert (config.dit.quantization, config.lm.quantization) == (INT8, "w8a8_dynamic")
    assert AppConfig.model_validate({"demo": True}).dit.quantization is None


def test_the_dit_deployment_loads_the_configured_quantization(demo_root):
    pytest.importorskip("ray")
    from serve.config import AppConfig
    from serve.deployments import load_dit

    config = AppConfig.model_validate({"checkpoints": str(demo_root), "dit": {"quantization": INT8, "device": "cpu"}})
    handler = load_dit(config, "acestep-v15-turbo")
    try:
        assert handler.quantization == INT8
        report = weight_bytes(handler.bundle.transformer)
        assert report.quantized_layers == report.linear_layers > 0
    finally:
        handler.loop.close()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", QUANTIZATION_MODES)
@torch.no_grad()
def test_quantized_modules_on_cuda(mode):
    """Each mode on a 2B-wide random block in bf16 (fp8 where the device has it): half the bf16
    bytes and close to the full-precision output."""
    if mode == "fp8_weight_only" and torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(ValueError, match="quantization='fp8_weight_only'"):
            quantize_modules(nn.Linear(64, 64, device="cuda"), mode)
        return
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(2048, 6144), nn.SiLU(), nn.Linear(6144, 2048)).to("cuda", torch.bfloat16)
    x = torch.randn(2, 250, 2048, device="cuda", dtype=torch.bfloat16)
    full = module(x).float()
    assert quantize_modules(module, mode) == 2
    assert weight_bytes(module).ratio_to_bf16 <= BF16_RATIO
    assert snr_db(full, module(x).float()) >= (FP8_MIN_SNR_DB if mode == "fp8_weight_only" else MIN_SNR_DB)


@pytest.mark.gpu
def test_fp8_demo_dit_renders_on_cuda(demo_root, tmp_path):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability >= 8.9")
    handlers = {}
    for mode in (None, "fp8_weight_only"):
        handlers[mode] = AceStepHandler()
        handlers[mode].initialize_service(str(demo_root), "acestep-v15-turbo", device="cuda", quantization=mode)
    params = GenerationParams(thinking=False, caption="warm", lyrics="la", duration=10)
    config = GenerationConfig(use_random_seed=False, batch_size=1, seeds=[7])
    latents = {}
    for mode, handler in handlers.items():
        result = generate_music(handler, None, params, config, save_dir=str(tmp_path))
        handler.loop.close()
        assert result.success, result.error
        latents[mode] = result.extra_outputs["latents"].float()
    assert torch.isfinite(latents["fp8_weight_only"]).all()
    assert snr_db(latents[None], latents["fp8_weight_only"]) >= FP8_MIN_SNR_DB


def test_bench_section_reports_bytes_time_and_snr_per_mode(tmp_path):
    from bench.common import Bench
    from bench.gpu import SECTIONS

    bench = Bench(tmp_path / "q.json", budget_s=600, device=torch.device("cpu"), tiny=True)
    SECTIONS["quantization"](bench, torch.float32, 1)
    rows = bench.results["sections"]["quantized dit"]
    assert {row["mode"] for row in rows} == {"none", "int8_weight_only", "w8a8_dynamic"}  # no fp8 on a CPU
    for row in rows:
        assert row["forward_ms"] > 0 and row["unquantized_ms"] > 0
        if row["mode"] == "none":
            assert row["vs_bf16"] == 2.0 and row["snr_db"] == float("inf")  # fp32 weights: twice bf16
        else:
            assert row["vs_bf16"] <= 0.6 and row["snr_db"] >= MIN_SNR_DB
    lm_rows = bench.results["sections"]["quantized lm"]
    assert {(row["mode"], row["rows"]) for row in lm_rows} == {(m, r) for m in ("none", "int8_weight_only")
                                                               for r in (2, 16)}
    for row in lm_rows:
        assert row["decode_ms_per_step"] is not None and row["unquantized_ms_per_step"] is not None
        if row["mode"] == "none":
            assert row["logits_snr_db"] == float("inf")
        else:
            assert row["vs_bf16"] <= 0.6 and row["logits_snr_db"] >= MIN_SNR_DB
