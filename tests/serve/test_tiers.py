"""Memory tiers (``acestep.tiers``): the tier each card size gets, ``acestep serve --gpu-memory-gb``
turning a tier into app config (field by field, the config winning), and the request limits the
ingress enforces before a task is created."""

from __future__ import annotations

import argparse
import asyncio
import re
from pathlib import Path

import pytest
import torch

from acestep.tiers import TIERS, detect_gpu_memory_gb, tier_for, tier_range
from serve.cli import DEFAULT_CONFIG, _app_args, add_serve_parser, load_serve_config
from serve.config import AppConfig, RequestLimits
from serve.edge import intake
from serve.edge.errors import FieldError
from serve.models import ModelSet
from serve.submission import Submission, within_limits

README = Path(__file__).resolve().parents[2] / "README.md"
INT8 = "int8_weight_only"

# card (GB) → (tier, offload_to_cpu, offload_dit_to_cpu, DiT quantization, max duration s with / without
# the LM, max batch with / without the LM, recommended LM, LM KV rows): the README's table says the same.
DOCUMENTED = {
    4: ("tier1", True, True, INT8, (240, 360), (1, 1), None, 2),
    6: ("tier2", True, True, INT8, (480, 600), (1, 1), None, 2),
    8: ("tier3", True, True, INT8, (480, 600), (2, 2), "acestep-5Hz-lm-0.6B", 4),
    12: ("tier4", True, True, INT8, (480, 600), (2, 4), "acestep-5Hz-lm-0.6B", 4),
    16: ("tier6a", True, False, INT8, (480, 600), (4, 8), "acestep-5Hz-lm-1.7B", 8),
    24: ("tier6b", False, False, None, (480, 480), (8, 8), "acestep-5Hz-lm-1.7B", 16),
    48: ("unlimited", False, False, None, (600, 600), (8, 8), "acestep-5Hz-lm-4B", None),
    80: ("unlimited", False, False, None, (600, 600), (8, 8), "acestep-5Hz-lm-4B", None),
}


@pytest.mark.parametrize("gb", sorted(DOCUMENTED))
def test_each_card_size_gets_its_documented_tier(gb):
    tier = tier_for(gb)
    name, offload, offload_dit, quantization, duration, batch, lm, kv_rows = DOCUMENTED[gb]
    assert (tier.name, tier.offload_to_cpu, tier.offload_dit_to_cpu, tier.quantization) == \
        (name, offload, offload_dit, quantization)
    assert (tier.max_duration_s, tier.max_batch_size, tier.lm_model, tier.lm_kv_rows) == (duration, batch, lm, kv_rows)
    if kv_rows is not None:  # the cache holds every CFG row of the tier's largest batch with the LM
        assert kv_rows >= 2 * tier.max_batch_size[0]


def test_tier_boundaries_and_reported_sizes():
    """Cards report a little less than their size: those still land in their class's tier."""
    assert [tier_for(gb).name for gb in (7.6, 11.7, 15.6, 23.6, 79.1, 139.8)] == \
        ["tier3", "tier4", "tier6a", "tier6b", "unlimited", "unlimited"]
    assert tier_for(4.01).name == "tier2" and tier_for(14).name == "tier5" and tier_for(20.5).name == "tier6b"
    assert [tier_range(t) for t in (TIERS[0], TIERS[2], TIERS[-1])] == ["<= 4 GB", "6-8 GB", "> 24 GB"]
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="gpu_memory_gb"):
            tier_for(bad)


def test_readme_table_matches_the_tiers():
    rows = {}
    for line in README.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells and re.fullmatch(r"tier\w+|unlimited", cells[0].strip("`")):
            rows[cells[0].strip("`")] = cells[1:]
    assert list(rows) == [tier.name for tier in TIERS]
    for tier in TIERS:
        memory, offload, quantization, lm, backend, duration, batch, kv_rows = rows[tier.name]
        assert memory == tier_range(tier)
        expected = "encoders + DiT" if tier.offload_dit_to_cpu else "encoders" if tier.offload_to_cpu else "none"
        assert offload == expected and quantization == (tier.quantization or "none")
        assert lm == (tier.lm_model.rsplit("-", 1)[-1] if tier.lm_model else "none") and backend == tier.lm_backend
        assert duration == "{} / {}".format(*tier.max_duration_s) and batch == "{} / {}".format(*tier.max_batch_size)
        assert kv_rows == str(tier.lm_kv_rows or "config")


def _cli(*argv, config=None):
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--demo", *(("--config", str(config)) if config else ()), *argv])
    return _app_args(args)


def test_gpu_memory_flag_applies_the_tier_where_the_config_is_silent(tmp_path):
    _, app, profile = _cli("--gpu-memory-gb", "8")
    config = AppConfig.model_validate(app["args"])
    assert (config.dit.offload_to_cpu, config.dit.offload_dit_to_cpu, config.lm.offload_to_cpu) == (True, True, True)
    assert config.dit.quantization == INT8
    assert (config.ingress.limits.max_duration_s, config.ingress.limits.max_batch_size) == (480, 2)
    assert config.lm.engine.max_rows == 4
    assert profile[0].startswith("memory profile: tier3 (6-8 GB) for 8 GB") and "(tier)" in profile[1]
    assert any(line.startswith("  lm (advice): acestep-5Hz-lm-0.6B on pt") for line in profile)

    # the config's own values win, field by field; without the LM the tier's DiT-only limits apply
    raw = load_serve_config(DEFAULT_CONFIG)
    args = raw["applications"][0]["args"]
    args["dit"]["quantization"] = None
    args["lm"]["enabled"] = False
    args.setdefault("ingress", {})["limits"] = {"max_duration_s": 120}
    path = tmp_path / "serve_config.yaml"
    path.write_text(__import__("yaml").safe_dump(raw))
    _, app, profile = _cli("--gpu-memory-gb", "12", config=path)
    config = AppConfig.model_validate(app["args"])
    assert config.dit.quantization is None and config.dit.offload_to_cpu is True
    assert (config.ingress.limits.max_duration_s, config.ingress.limits.max_batch_size) == (120, 4)
    assert "max_duration_s" not in config.ingress.limits.origin
    assert "  dit.quantization: null (config)" in profile and "  ingress.limits.max_duration_s: 120 (config)" in profile
    assert "  ingress.limits.max_batch_size: 4 (tier)" in profile


def test_no_flag_no_profile_and_bad_values_are_refused(capsys):
    _, app, profile = _cli()
    assert profile == [] and "limits" not in (app["args"].get("ingress") or {})
    for bad in ("0", "-8", "lots", "inf"):
        with pytest.raises(SystemExit):
            _cli("--gpu-memory-gb", bad)
        assert "--gpu-memory-gb" in capsys.readouterr().err


def test_auto_without_a_gpu_picks_no_tier(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the child process that detects sees no CUDA device
    _, app, profile = _cli("--gpu-memory-gb", "auto")
    assert profile == ["memory profile: none (no CUDA device found; --gpu-memory-gb N picks a tier)"]
    assert "limits" not in (app["args"].get("ingress") or {})


@pytest.mark.gpu
def test_auto_on_a_gpu_reads_the_card_size():
    gb = detect_gpu_memory_gb()
    assert gb == pytest.approx(torch.cuda.get_device_properties(0).total_memory / (1 << 30))
    _, _, profile = _cli("--gpu-memory-gb", "auto")
    assert profile[0].startswith(f"memory profile: {tier_for(gb).name} ") and profile[0].endswith("(detected)")


def _placement(app):
    config = AppConfig.model_validate(app["args"])
    deployments = {"lm": (config.lm, len(config.lm_models())), "dit": (config.dit, len(config.dit_models()))}
    return config, {role: (settings.device, settings.deployment.ray_actor_options.num_gpus,
                           settings.deployment.autoscaling_config.max_replicas, count)
                    for role, (settings, count) in deployments.items()}


def test_one_gpu_box_shares_the_card_between_lm_and_dit():
    _, app, profile = _cli("--gpu-memory-gb", "8", "--num-gpus", "1")
    config, placed = _placement(app)
    (lm_device, lm_share, lm_max, lms), (dit_device, dit_share, dit_max, dits) = placed["lm"], placed["dit"]
    assert (lm_device, dit_device, lm_max, dit_max) == ("cuda", "cuda", 1, 1)
    assert dits == 2 and lm_share > 0 and dit_share > 0  # the demo serves turbo and base
    assert lm_share * lms + dit_share * dits == pytest.approx(1.0, abs=1e-3)  # every deployment fits one GPU
    assert config.ingress.deployment.ray_actor_options.num_gpus == 0
    assert config.dit.offload_to_cpu and config.lm.offload_to_cpu  # the tier's offload between phases
    assert "  placement: one GPU shared by the LM and DiT deployments (one-box)" in profile


def test_one_box_keeps_a_scale_to_zero_of_the_config(tmp_path):
    raw = load_serve_config(DEFAULT_CONFIG)
    raw["applications"][0]["args"]["dit"]["deployment"]["autoscaling_config"]["min_replicas"] = 0
    path = tmp_path / "serve_config.yaml"
    path.write_text(__import__("yaml").safe_dump(raw))
    _, app, profile = _cli("--gpu-memory-gb", "24", "--num-gpus", "1", config=path)
    config = AppConfig.model_validate(app["args"])
    scaling = {role: getattr(config, role).deployment.autoscaling_config for role in ("lm", "dit")}
    assert (scaling["dit"].min_replicas, scaling["dit"].max_replicas) == (0, 1)
    assert (scaling["lm"].min_replicas, scaling["lm"].max_replicas) == (1, 1)
    assert any(line.startswith("  dit: device cuda") and "zero when idle" in line for line in profile)


def test_one_box_leaves_gpu_placements_of_the_config_and_multi_gpu_machines(tmp_path):
    raw = load_serve_config(DEFAULT_CONFIG)
    raw["applications"][0]["args"]["dit"]["deployment"]["ray_actor_options"]["num_gpus"] = 0.5
    path = tmp_path / "serve_config.yaml"
    path.write_text(__import__("yaml").safe_dump(raw))
    _, app, profile = _cli("--gpu-memory-gb", "24", "--num-gpus", "1", config=path)
    _, placed = _placement(app)
    assert placed["dit"][:3] == ("cpu", 0.5, 3) and placed["lm"][:3] == ("cuda", 0.25, 1)
    assert "  dit.deployment.ray_actor_options.num_gpus: 0.5 (config)" in profile
    for gpus in ("0", "2"):
        _, app, profile = _cli("--gpu-memory-gb", "24", "--num-gpus", gpus)
        _, placed = _placement(app)
        assert placed["lm"][:2] == placed["dit"][:2] == ("cpu", 0.0)
        assert profile[-1].startswith("  placement: unchanged")


def _tier_limits(gb):
    _, app, _ = _cli("--gpu-memory-gb", str(gb))
    return AppConfig.model_validate(app["args"]).ingress.limits


def test_a_request_over_the_tier_is_refused_naming_field_limit_and_memory():
    limits = _tier_limits(4)  # tier1 with the LM: 240 s, 1 song
    params, config, _, _ = intake.to_params({"caption": "x", "duration": 300}, {}, 1 << 20)
    with pytest.raises(FieldError) as raised:
        within_limits(limits, params, config, ["caption", "duration"])
    error = raised.value
    assert error.status_code == 422 and error.loc == ["body", "duration"]
    assert "240 seconds" in error.message and "for 4 GB of GPU memory" in error.message

    params, config, _, _ = intake.to_params({"caption": "x", "duration": 240, "batch_size": 3}, {}, 1 << 20)
    with pytest.raises(FieldError) as raised:
        within_limits(limits, params, config, ["caption", "duration", "batch_size"])
    assert raised.value.loc == ["body", "batch_size"] and "at most 1 " in raised.value.message
    # the default batch (2) is lowered, never refused; auto duration (-1) is not a request for more
    params, config, _, _ = intake.to_params({"caption": "x"}, {}, 1 << 20)
    assert within_limits(limits, params, config, ["caption"]).batch_size == 1
    # a limit set by hand names its config key
    with pytest.raises(FieldError, match=r"ingress\.limits\.max_duration_s"):
        within_limits(RequestLimits(max_duration_s=60), params.__class__(duration=61), config, None)


class _KnownModels:
    """The two facts ``_prepare`` asks the ingress state (normally from the DiT deployments)."""

    async def turbo_by_model(self):
        return {"acestep-v15-turbo": True}

    async def family_by_model(self):
        return {"acestep-v15-turbo": "turbo"}


def test_every_dialect_meets_the_limit_in_prepare():
    """``Submission._prepare``, which the native, Python, release_task and chat routes all call."""
    config = AppConfig.model_validate({"demo": True, "lm": {"enabled": False},
                                       "ingress": {"limits": {"max_duration_s": 30, "max_batch_size": 1,
                                                              "origin": {"max_duration_s": "tier1 for 4 GB"}}}})
    ingress = Submission()
    ingress.config, ingress.served, ingress.state = config, ModelSet(("acestep-v15-turbo",), ("lm",)), _KnownModels()
    params, gen, _, _ = intake.to_params({"caption": "x", "duration": 45}, {}, 1 << 20)
    with pytest.raises(FieldError) as raised:
        asyncio.run(ingress._prepare(params, gen, {}, {}, ["caption", "duration"]))
    assert raised.value.loc == ["body", "duration"] and "30 seconds" in raised.value.message
    params, gen, _, _ = intake.to_params({"caption": "x", "duration": 20}, {}, 1 << 20)
    _, prepared, seeds, _ = asyncio.run(ingress._prepare(params, gen, {}, {}, ["caption", "duration"]))
    assert prepared.batch_size == 1 and len(seeds) == 1


def _wav(seconds: float) -> bytes:
    import io

    import numpy as np
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.zeros((int(seconds * 8000), 1), dtype=np.int16), 8000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def test_a_source_longer_than_the_tier_is_refused_before_a_task_exists():
    """A source task renders the source's length: the tier's longest song bounds the source too."""
    from serve.edge.uploads import UploadChecker
    from serve.ingress_state import MAX_UPLOAD_SECONDS

    config = AppConfig.model_validate({"demo": True, "ingress": {"limits": {
        "max_duration_s": 30, "origin": {"max_duration_s": "memory tier tier1 (<= 4 GB) for 4 GB"}}}})
    ingress = Submission()
    ingress.config, ingress.state = config, type("State", (), {"uploads": UploadChecker(MAX_UPLOAD_SECONDS)})()
    try:
        with pytest.raises(FieldError) as raised:
            asyncio.run(ingress._check_uploads({"src_audio": _wav(31)}, 1 << 22, {"src_audio": "ctx_audio"}))
        assert raised.value.status_code == 422 and raised.value.loc == ["body", "ctx_audio"]
        assert "31.0 seconds long" in raised.value.message and "at most 30 seconds" in raised.value.message
        assert "tier1" in raised.value.message
        # a reference (timbre: its first 30 s) may be longer; a source within the limit passes
        files = {"src_audio": _wav(29), "reference_audio": _wav(40)}
        assert asyncio.run(ingress._check_uploads(files, 1 << 22)) is files
    finally:
        ingress.state.uploads.close()


def test_the_lm_decides_durations_within_the_longest_song(demo_root):
    from serve.deployments import load_lm

    config = AppConfig.model_validate({"checkpoints": str(demo_root), "lm": {"device": "cpu"},
                                       "ingress": {"limits": {"max_duration_s": 30}}})
    handler = load_lm(config, config.lm.model)
    try:
        assert handler.max_duration == 30  # the duration FSM's upper bound (tests/lm/test_constrained.py)
    finally:
        handler.unload()


def test_an_extension_renders_in_windows_no_longer_than_the_longest_song(demo_root):
    from serve.deployments import load_dit

    config = AppConfig.model_validate({"checkpoints": str(demo_root), "dit": {"device": "cpu"},
                                       "ingress": {"limits": {"max_duration_s": 30}}})
    handler = load_dit(config, config.dit.model)
    try:
        assert (handler.extend.window_s, handler.extend.context_s) == (30, 15)
    finally:
        handler.loop.close()
