"""CPU offload and the memory planner: the planner's peak is the largest phase with offload and
the sum without (demo modules, and the full-size 2B / XL shapes on the meta device); a render with
offload moves each phase's modules in the worker's phase order, runs every offloaded module only
while it is on the device, and equals the render without offload bit for bit; the LM's weights
leave the device when its engine runs out of work. The CUDA test (marker ``gpu``) measures the
peak allocation of a render with and without offload."""

from __future__ import annotations

import gc
import logging

import pytest
import torch

from acestep.handler import AceStepHandler
from acestep.inference import GenerationConfig, GenerationParams, generate_music
from acestep.llm_inference import LLMHandler
from acestep.memory import DIT_MODULES, DIT_PHASES, dit_modules, dit_offloaded, module_bytes, plan_memory
from acestep.offload import Move

LM_NAME = "acestep-5Hz-lm-0.6B"


def _offloaded_handler(demo_root, device: str = "cpu", dit_too: bool = True) -> AceStepHandler:
    handler = AceStepHandler()
    handler.initialize_service(str(demo_root), "acestep-v15-turbo", device=device, offload_to_cpu=True,
                               offload_dit_to_cpu=dit_too)
    return handler


@pytest.fixture(scope="module")
def offloaded(demo_root):
    handler = _offloaded_handler(demo_root)
    yield handler
    handler.loop.close()


def _audio(handler, seeds=(3, 4), **fields):
    params = GenerationParams(thinking=False, caption="offloaded", duration=10, **fields)
    result = generate_music(handler, None, params, GenerationConfig(batch_size=len(seeds), seeds=list(seeds),
                                                                    use_random_seed=False))
    assert result.success, result.error
    return [a["tensor"] for a in result.audios]


def test_module_bytes_counts_parameters_and_buffers_once():
    linear = torch.nn.Linear(4, 3)  # 12 + 3 fp32 values
    linear.register_buffer("scale", torch.ones(5, dtype=torch.float16))
    tied = torch.nn.Sequential(linear, linear)
    assert module_bytes(linear) == module_bytes(tied) == 15 * 4 + 5 * 2


def test_plan_is_largest_phase_with_offload_and_sum_without(turbo_handler):
    modules = dit_modules(turbo_handler.bundle)
    sizes = {name: module_bytes(m) for name, m in modules.items()}
    phase_sums = {phase: sum(sizes[n] for n in set(members)) for phase, members in DIT_PHASES.items()}

    resident = plan_memory(modules, DIT_PHASES)
    assert resident.peak_bytes == resident.total_bytes == sum(sizes.values())
    full = plan_memory(modules, DIT_PHASES, dit_offloaded(True, True))
    assert full.phase_bytes == phase_sums
    assert full.peak_bytes == max(phase_sums.values()) < resident.peak_bytes
    keep_dit = plan_memory(modules, DIT_PHASES, dit_offloaded(True, False))
    others = {p: sum(sizes[n] for n in set(m) if n != "transformer") for p, m in DIT_PHASES.items()}
    assert keep_dit.peak_bytes == sizes["transformer"] + max(others.values())
    assert dit_offloaded(False, True) == () and set(dit_offloaded(True, True)) == set(DIT_MODULES)
    with pytest.raises(ValueError, match="lm"):
        plan_memory(modules, {"lm": ("lm",)})


@pytest.mark.parametrize("variant", ["turbo", "xl-turbo"])
def test_full_size_plan_fits_small_cards_with_offload(variant):
    from bench.models import build_text_encoder
    from acestep.checkpoints.demo import real_config
    from acestep.checkpoints.loader import build_dit_modules
    from diffusers import AutoencoderOobleck

    modules = {n: m.to(torch.bfloat16) for n, m in build_dit_modules(real_config(f"acestep-v15-{variant}")).items()}
    with torch.device("meta"):
        modules["vae"] = AutoencoderOobleck.from_config(real_config("vae")).to(torch.bfloat16)
    modules["text_encoder"] = build_text_encoder(False, "meta", torch.bfloat16)
    gib = 1024 ** 3
    resident = plan_memory(modules, DIT_PHASES)
    offloaded = plan_memory(modules, DIT_PHASES, dit_offloaded(True, True))
    assert offloaded.peak_bytes == offloaded.phase_bytes["sample"]  # the DiT is the largest phase
    assert offloaded.peak_bytes < resident.peak_bytes
    # offloaded, the 2B side needs < 3 GiB of bf16 weights at once (an 8 GB card keeps room for the
    # activations); XL's DiT alone is ~7.8 GiB, so an 8 GB card needs it quantized as well
    assert (offloaded.peak_bytes < 3 * gib) == (variant == "turbo")
    assert resident.peak_bytes > 5.5 * gib


def test_offloaded_render_moves_phase_by_phase_and_equals_resident(offloaded, turbo_handler):
    offloader = offloaded.worker.offload
    present_when_run = []
    hooks = [sub.register_forward_pre_hook(lambda _m, _args, name=name: present_when_run.append(
        name in offloader.present)) for name, module in offloader.modules.items() for sub in module.modules()]
    try:
        start = len(offloader.moves)
        audio = _audio(offloaded)
    finally:
        for hook in hooks:
            hook.remove()
    assert present_when_run and all(present_when_run)  # no offloaded module ran off the device
    moves = offloader.moves[start:]
    arrivals = [m.phase for m in moves if m.to_device]
    assert list(dict.fromkeys(arrivals)) == ["encode", "text", "sample", "decode"]
    assert [m.module for m in moves if m.phase == "sample" and m.to_device] == ["transformer"]  # once for 8 steps
    assert {m.module for m in moves if m.phase == "text" and not m.to_device} == {
        "vae", "audio_tokenizer", "audio_token_detokenizer"}  # the condition encoder stays for the text phase
    assert moves[-1] == Move("release", "vae", False) and offloader.present == []
    reference = _audio(turbo_handler)
    assert all(torch.equal(a, b) for a, b in zip(audio, reference))


def test_dit_stays_resident_without_offload_dit_to_cpu(demo_root):
    handler = _offloaded_handler(demo_root, dit_too=False)
    try:
        assert "transformer" not in handler.worker.offload.modules
        assert handler.memory_plan.peak_bytes < handler.memory_plan.total_bytes
        _audio(handler, seeds=(5,))
        assert "transformer" not in {m.module for m in handler.worker.offload.moves}
    finally:
        handler.loop.close()


def test_offload_is_honoured_not_ignored(demo_root, caplog):
    with caplog.at_level(logging.INFO):
        handler = _offloaded_handler(demo_root)
        handler.loop.close()
        llm = LLMHandler()
        llm.initialize(str(demo_root), LM_NAME, backend="pt", device="cpu", offload_to_cpu=True)
        llm.unload()
    text = caplog.text
    assert "not used" not in text and "not supported" not in text
    assert "peak" in text and "offloaded" in text  # the memory plan is logged


def test_lm_weights_leave_while_the_engine_is_idle(demo_root):
    params = GenerationParams(caption="rock", bpm=100, keyscale="E minor", timesignature="4", duration=10)
    plans = {}
    for offload in (False, True):
        llm = LLMHandler()
        llm.initialize(str(demo_root), LM_NAME, backend="pt", device="cpu", offload_to_cpu=offload)
        offloader = llm.llm.offloader
        try:
            plans[offload] = llm.plan(params, GenerationConfig(batch_size=1), [7])[0].audio_codes
        finally:
            llm.unload()
        moves = [(m.phase, m.module, m.to_device) for m in offloader.moves]
        assert moves == ([("lm", "lm", True), ("release", "lm", False)] if offload else [])
        assert offloader.present == []
    assert plans[True] and plans[True] == plans[False]


@pytest.mark.gpu
def test_offload_lowers_the_cuda_peak(demo_root):
    peaks = {}
    for offload in (True, False):  # what the first run leaves allocated can only raise the second's peak
        gc.collect()
        torch.cuda.empty_cache()
        handler = AceStepHandler()
        handler.initialize_service(str(demo_root), "acestep-v15-turbo", device="cuda", offload_to_cpu=offload,
                                   offload_dit_to_cpu=offload)
        try:
            torch.cuda.reset_peak_memory_stats()
            audio = _audio(handler, seeds=(3,))
            peaks[offload] = torch.cuda.max_memory_allocated()
        finally:
            handler.loop.close()
        assert torch.isfinite(audio[0]).all()
        del handler
    assert peaks[True] < peaks[False]


def test_memory_bench_puts_each_card_profile_beside_the_resident_run(demo_root, tmp_path):
    from bench.common import Bench
    from bench.memory import SECTION, bench_memory

    bench = Bench(tmp_path / "memory.json", 600, torch.device("cpu"), tiny=True)
    bench_memory(bench, torch.float32, root=demo_root)
    profile, resident = bench.results["sections"][SECTION]
    assert (profile["profile"], resident["profile"]) == ("tier3 (8 GB)", "resident, full precision")
    assert profile["kv_rows"] == resident["kv_rows"] == 4  # the 8 GB tier's LM cache, in both runs
    assert profile["planned_weights_mib"] < resident["planned_weights_mib"]  # offload + int8
    assert profile["planned_weights_vs_resident"] < 1 == resident["planned_weights_vs_resident"]
    assert profile["s_per_song"] > 0 and resident["s_per_song_vs_resident"] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("pairing", ["turbo + 0.6B on 8 GB", "xl-turbo + 1.7B on 16 GB"])
def test_a_120_s_song_fits_its_card_at_full_size(pairing, demo_root):
    """2B turbo + 0.6B LM under 8 GB with the 8 GB tier (offload + int8); XL turbo + 1.7B LM under
    16 GB with the 16 GB tier; random full-size weights (bench.memory)."""
    from bench.memory import FULL_PAIRINGS, Profile, measure

    chosen = FULL_PAIRINGS[0 if pairing.startswith("turbo") else 1]
    row = measure(chosen, Profile.of_card(chosen.card_gb), False, torch.device("cuda"), torch.bfloat16, demo_root)
    logging.getLogger(__name__).warning("%s: %s", pairing, row)
    assert row["max_allocated_mib"] * 2**20 < chosen.card_gb * 1e9


def test_the_deployments_load_with_the_configured_offload(demo_root):
    pytest.importorskip("ray")
    from serve.config import AppConfig
    from serve.deployments import load_dit

    config = AppConfig.model_validate({"checkpoints": str(demo_root),
                                       "dit": {"device": "cpu", "offload_to_cpu": True, "offload_dit_to_cpu": True}})
    handler = load_dit(config, "acestep-v15-turbo")
    try:
        plan = handler.memory_plan
        assert "transformer" in plan.offloaded and plan.peak_bytes < plan.total_bytes
    finally:
        handler.loop.close()
    assert AppConfig.model_validate({"demo": True}).lm.offload_to_cpu is False
