"""DiT adapters on demo checkpoints: the official PEFT layout and the diffusers file load and agree,
scale 0 is the base model, the same seed reproduces, fused equals unfused, and requests with
different adapters share the worker but never a forward."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest
import torch

from acestep.checkpoints.demo_lora import write_demo_lora, write_demo_lora_diffusers
from acestep.dit.adapters import AdapterError, adapter_setting, read_adapter, resolve_adapter_path
from acestep.dit.prepare import sampling_settings
from acestep.params import GenerationParams
from tests.conftest import dit_handler
from tests.dit.test_batching import _wait_for, held


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    write_demo_lora(root / "warm", seed=1)
    write_demo_lora(root / "bright", seed=2)
    write_demo_lora(root / "dark", seed=3)
    write_demo_lora_diffusers(root / "warm_file.safetensors", seed=1)
    return root


@pytest.fixture(scope="module")
def handler(demo_root):
    """A handler of its own: adapters change its transformer's modules."""
    handler = dit_handler(demo_root)
    yield handler
    handler.loop.close()


def _render(handler, seed=7, adapters=None, caption="warm pad", duration=4):
    params = GenerationParams(thinking=False, caption=caption, duration=duration, inference_steps=4)
    settings = sampling_settings(params)
    if adapters is not None:
        settings = replace(settings, adapters=adapters)
    return handler.submit([params], [seed], settings)


def _audio(future):
    return future.result().audios[0]


def test_official_peft_layout_reads_with_its_own_rank_and_alpha(adapter_dir):
    adapter = read_adapter(adapter_dir / "warm")
    info = adapter.info
    assert (info.format, info.kind, info.rank, info.alpha) == ("peft", "lora", 4, 8.0)
    assert len(info.target_modules) == 16 and "layers.0.self_attn.to_out.0" in info.target_modules
    converted = read_adapter(adapter_dir / "warm_file.safetensors")
    assert converted.info.format == "diffusers" and converted.info.name == "warm_file"
    assert converted.state_dict.keys() == adapter.state_dict.keys()


def test_scale_zero_is_the_base_model_scale_one_differs_and_the_seed_reproduces(handler, adapter_dir):
    base = _audio(_render(handler))
    info = handler.load_lora(str(adapter_dir / "warm"))
    try:
        assert info.name == "warm" and handler.lora_setting == (("warm", 1.0),)
        with_lora = _audio(_render(handler))
        assert not torch.allclose(with_lora, base, atol=1e-4)
        assert torch.equal(_audio(_render(handler)), with_lora)  # same seed + adapter: bit for bit
        assert torch.equal(_audio(_render(handler, adapters=(("warm", 1.0),))), with_lora)
        handler.set_lora_scale(0.0)
        assert torch.equal(_audio(_render(handler)), base)
        handler.set_lora_scale(0.5)
        half = _audio(_render(handler))
        assert not torch.allclose(half, base, atol=1e-4) and not torch.allclose(half, with_lora, atol=1e-4)
        handler.set_use_lora(False)
        assert torch.equal(_audio(_render(handler)), base)
        assert handler.get_lora_status()["adapters"] == {"warm": {"scale": 0.5, "default": True}}
    finally:
        handler.unload_lora()
    assert torch.equal(_audio(_render(handler)), base)  # unloaded: the base modules again


def test_diffusers_file_of_the_same_adapter_renders_the_same(handler, adapter_dir):
    handler.load_lora(str(adapter_dir / "warm"), activate=False)
    handler.load_lora(str(adapter_dir / "warm_file.safetensors"), activate=False)
    try:
        official = _audio(_render(handler, adapters=(("warm", 1.0),)))
        converted = _audio(_render(handler, adapters=(("warm_file", 1.0),)))
        assert torch.allclose(official, converted, atol=1e-6)
    finally:
        handler.unload_lora()


def test_fused_weights_equal_the_unfused_adapter(handler, adapter_dir):
    handler.load_lora(str(adapter_dir / "bright"))
    try:
        unfused = _audio(_render(handler))
        handler.fuse_lora()
        try:
            assert handler.stats()["adapters"]["fused"] == "bright@1"
            fused = _audio(_render(handler))
            with pytest.raises(AdapterError, match="fused"):
                _audio(_render(handler, adapters=()))
        finally:
            handler.unfuse_lora()
        assert torch.allclose(fused, unfused, atol=1e-5) and (fused - unfused).abs().max() > 0
    finally:
        handler.unload_lora()


def test_a_weighted_blend_of_two_adapters_equals_its_merged_weights(handler, adapter_dir):
    handler.load_lora(str(adapter_dir / "warm"))
    handler.load_lora(str(adapter_dir / "bright"))
    try:
        handler.set_lora_scale(0.5, "warm")
        handler.set_lora_scale(1.5, "bright")
        assert handler.lora_setting == (("bright", 1.5), ("warm", 0.5))
        blend = _audio(_render(handler))
        assert torch.equal(_audio(_render(handler, adapters=adapter_setting({"warm": 0.5, "bright": 1.5}))), blend)
        for solo in ({"warm": 0.5}, {"bright": 1.5}):
            assert not torch.allclose(_audio(_render(handler, adapters=adapter_setting(solo))), blend, atol=1e-4)
        handler.fuse_lora()  # W + 0.5 dW_warm + 1.5 dW_bright, merged
        try:
            merged = _audio(_render(handler))
        finally:
            handler.unfuse_lora()
        assert torch.allclose(merged, blend, atol=1e-5) and (merged - blend).abs().max() > 0
    finally:
        handler.unload_lora()


def test_different_adapters_share_the_worker_but_never_a_forward(handler, adapter_dir):
    for name in ("warm", "bright"):
        handler.load_lora(str(adapter_dir / name), activate=False)
    try:
        solo = {name: _audio(_render(handler, adapters=((name, 1.0),))) for name in ("warm", "bright")}
        before = handler.stats()
        with held(handler):
            futures = {name: _render(handler, adapters=((name, 1.0),)) for name in ("warm", "bright")}
            same = [_render(handler, seed=8, adapters=(("warm", 1.0),)), _render(handler, seed=9, adapters=(("warm", 1.0),))]
            _wait_for(lambda: handler.stats()["waiting"] == 4)
        for name, future in futures.items():  # within fp32 rounding: the VAE decodes finished items together
            assert torch.allclose(_audio(future), solo[name], atol=1e-5)
        [f.result() for f in same]
        after = handler.stats()
        forwards, items = _delta(before, after, "forwards_by_adapters"), _delta(before, after, "items_per_forward")
        # every step: warm's three requests share one forward, bright runs in a forward of its own
        steps = forwards["warm@1"]
        assert steps >= 4 and forwards == {"warm@1": steps, "bright@1": steps} and items == {3: steps, 1: steps}
    finally:
        handler.unload_lora()


def _delta(before, after, key):
    return {k: v - before[key].get(k, 0) for k, v in after[key].items() if v != before[key].get(k, 0)}


def test_errors_name_the_adapter_and_the_problem(handler, adapter_dir, tmp_path):
    with pytest.raises(AdapterError, match="'dark' is not loaded"):
        _audio(_render(handler, adapters=(("dark", 1.0),)))
    with pytest.raises(AdapterError, match="lora_scale"):
        adapter_setting("warm", 2.5)
    with pytest.raises(AdapterError, match="adapter name"):
        adapter_setting("../warm")
    for bad in ("../warm", "/etc/passwd", "a/b", "warm.safetensors/.."):
        with pytest.raises(AdapterError, match="lora_path"):
            resolve_adapter_path(adapter_dir, bad)
    assert resolve_adapter_path(adapter_dir, "warm_file").name == "warm_file.safetensors"
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="not an adapter folder"):
        read_adapter(tmp_path / "empty")
    foreign = write_demo_lora(tmp_path / "foreign", seed=4)
    weights = foreign / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file
    state = {k.replace("layers.1.", "layers.7."): v for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights))
    with pytest.raises(AdapterError, match="not in this DiT"):
        handler.load_lora(str(foreign))
    lokr_config = json.loads((foreign / "adapter_config.json").read_text()) | {"peft_type": "IA3"}
    (foreign / "adapter_config.json").write_text(json.dumps(lokr_config))
    with pytest.raises(AdapterError, match="IA3"):
        read_adapter(foreign)
    (foreign / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json is not readable JSON"):
        read_adapter(foreign)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(AdapterError, match="not readable safetensors"):
        read_adapter(truncated)


def test_unloading_an_adapter_in_use_is_refused(handler, adapter_dir):
    handler.load_lora(str(adapter_dir / "dark"), activate=False)
    stepped, release, errors = threading.Event(), threading.Event(), []

    def progress(_fraction, _message):  # runs on the worker thread: hold it after the first step
        if not stepped.is_set():
            stepped.set()
            release.wait(60)

    def unload():
        try:
            handler.unload_lora("dark")
        except AdapterError as error:
            errors.append(error)

    params = GenerationParams(thinking=False, caption="x", duration=4, inference_steps=4)
    future = handler.submit([params], [7], replace(sampling_settings(params), adapters=(("dark", 1.0),)), progress)
    try:
        assert stepped.wait(60)
        thread = threading.Thread(target=unload)
        thread.start()
        _wait_for(lambda: len(handler.loop._calls) == 1)  # queued for the next step boundary
        release.set()
        thread.join()
        assert len(errors) == 1 and "in use" in str(errors[0])
        future.result()
        assert handler.unload_lora("dark") == ["dark"]
    finally:
        release.set()


def test_demo_checkpoints_can_write_a_demo_lora_that_maps(tmp_path, capsys):
    from acestep.cli import main

    assert main(["demo-checkpoints", str(tmp_path / "ck"), "--lora", str(tmp_path / "loras" / "demo")]) == 0
    assert (tmp_path / "loras" / "demo" / "adapter_config.json").is_file()
    assert main(["lora", "inspect", str(tmp_path / "loras" / "demo"), "--checkpoints", str(tmp_path / "ck")]) == 0
    assert "16/16 target modules" in capsys.readouterr().out


def test_lora_inspect_reports_format_rank_targets_and_fit(demo_root, adapter_dir, capsys):
    from acestep.cli import main

    assert main(["lora", "inspect", str(adapter_dir / "warm"), "--checkpoints", str(demo_root)]) == 0
    out = capsys.readouterr().out
    assert "format: peft (lora)" in out and "rank: 4  alpha: 8" in out
    assert "maps onto acestep-v15-turbo: 16/16 target modules" in out
    # against the real 2B turbo (meta device): every tiny factor's shape disagrees
    assert main(["lora", "inspect", str(adapter_dir / "warm_file.safetensors")]) == 1
    out = capsys.readouterr().out
    assert "maps onto acestep-v15-turbo: 0/16 target modules" in out and "model 2048x2048" in out
    assert main(["lora", "inspect", str(adapter_dir)]) == 1
    assert "not an adapter folder" in capsys.readouterr().err


def test_a_peft_lokr_adapter_loads_and_matches_peft(tmp_path):
    """LoKr (Kronecker factors) in the PEFT layout: the same outputs as peft's own model."""
    from peft import LoKrConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    from acestep.checkpoints.demo import tiny_dit_config
    from acestep.checkpoints.loader import build_dit_modules
    from acestep.dit.adapters import AdapterSlots

    def tiny():
        torch.manual_seed(0)
        return build_dit_modules(tiny_dit_config("turbo"), device="cpu")["transformer"]

    config = LoKrConfig(r=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_weights=False)
    reference = get_peft_model(tiny(), config)
    folder = tmp_path / "texture"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in get_peft_model_state_dict(reference).items()}
    assert next(iter(state)).startswith("base_model.model.layers.")  # as PEFT's save_pretrained names them
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({**config.to_dict(), "peft_type": "LOKR",
                                                            "target_modules": list(config.target_modules)}))
    adapter = read_adapter(folder)
    assert (adapter.info.kind, adapter.info.format, adapter.info.rank, adapter.info.alpha) == ("lokr", "peft", 4, 8.0)
    model = tiny()
    x = torch.randn(1, 24, 32)
    base = model.layers[0].self_attn.to_q(x).detach()
    slots = AdapterSlots(model)
    slots.load(adapter)
    slots.activate((("texture", 1.0),))
    ours = model.layers[1].cross_attn.to_v(x).detach()
    assert torch.allclose(ours, reference.base_model.model.layers[1].cross_attn.to_v(x).detach(), atol=1e-5)
    assert not torch.allclose(model.layers[0].self_attn.to_q(x).detach(), base, atol=1e-4)
