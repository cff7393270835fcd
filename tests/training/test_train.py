"""LoRA / LoKr training in one process on the demo checkpoints: upstream's training step (loss and
gradients on upstream's own numbers, fixture from tests/fixtures/upstream/make_training.py), 20-step
runs that lower the loss, adapters that load through our loader and change a render, and the files
in upstream's PEFT layout (which peft's own loader, upstream's ``load_lora`` path, reads)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from acestep.checkpoints.demo import tiny_dit_config
from acestep.checkpoints.loader import build_dit_modules
from acestep.checkpoints.mapping import unmap_name
from acestep.dit.prepare import sampling_settings
from acestep.params import GenerationParams
from acestep.training.lora import AdapterSpec, _official_key, inject
from acestep.training.loop import TrainConfig, Trainer
from acestep.training.objective import Objective, flow_matching_loss
from acestep.training.run import load_for_training, train
from acestep.training.samples import SampleSet
from tests.conftest import dit_handler
from tests.fixtures.upstream.xl_parity import deterministic_weights
from tests.training.conftest import one_thread

UPSTREAM = torch.load(Path(__file__).resolve().parents[1] / "fixtures" / "upstream" / "training.pt", weights_only=True)
WINDOW = 5


def _upstream_modules() -> dict:
    """The tiny turbo modules holding the weights upstream's model held in the fixture."""
    config = tiny_dit_config("turbo")
    expected = json.loads(UPSTREAM["config"])
    assert {k: config[k] for k in expected} == expected
    modules = build_dit_modules(config, device="cpu")
    official = {unmap_name(c, inner): (c, inner) for c, module in modules.items()
                for inner in module.state_dict() if inner != "silence_latent"}
    shapes = {name: tuple(modules[c].state_dict()[i].shape) for name, (c, i) in official.items()}
    weights = deterministic_weights(shapes)
    for name, (component, inner) in official.items():
        modules[component].get_parameter(inner).data.copy_(weights[name])
    return modules


def test_a_training_step_is_upstreams_loss_and_gradients():
    """CFG dropout (seed 0 drops the condition), noise, the max-of-two logit-normal t, x_t and the
    velocity MSE: upstream's loss and LoRA gradients for the same seeds, fp32."""
    modules = _upstream_modules()
    transformer = modules["transformer"]
    params = dict(inject(transformer, AdapterSpec(rank=4, alpha=8, dropout=0.0)))
    ours = {_official_key(n.replace(".default", "")): p for n, p in params.items()}
    theirs = {n.replace(".default", ""): n for n in UPSTREAM["lora"]}
    assert ours.keys() == theirs.keys()
    with torch.no_grad():
        for name, p in ours.items():
            p.copy_(UPSTREAM["lora"][theirs[name]])
    x = UPSTREAM["inputs"]
    objective = Objective(cfg_ratio=UPSTREAM["cfg_ratio"])
    for step in UPSTREAM["steps"]:
        transformer.zero_grad(set_to_none=True)
        torch.manual_seed(step["seed"])
        loss = flow_matching_loss(transformer, modules["condition_encoder"].null_condition_emb,
                                  [x["target_latents"][0]], [x["encoder_hidden_states"][0]],
                                  [x["context_latents"][0]], [torch.default_generator], objective)
        loss.backward()
        torch.testing.assert_close(loss.detach(), step["loss"], rtol=1e-5, atol=1e-6)
        for name, p in ours.items():
            torch.testing.assert_close(p.grad, step["grads"][theirs[name]], rtol=1e-4, atol=1e-6)


def _config(kind: str, **overrides) -> TrainConfig:
    values = dict(adapter=AdapterSpec(kind=kind, rank=4, alpha=8, dropout=0.0), steps=20, batch_size=2,
                  grad_accumulation=1, learning_rate=1e-2, warmup_steps=1, checkpoint_every=10)
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module", params=["lora", "lokr"])
def run(request, demo_root, prepared, tmp_path_factory):
    with one_thread():
        return train(str(demo_root), "acestep-v15-turbo", str(prepared), str(tmp_path_factory.mktemp(request.param)),
                     _config(request.param))


@pytest.fixture(scope="module")
def handler(demo_root):
    handler = dit_handler(demo_root)
    yield handler
    handler.loop.close()


def test_twenty_steps_lower_the_training_loss(run):
    assert run.steps == 20 and len(run.losses) == 20 and all(np.isfinite(run.losses))
    assert np.mean(run.losses[-WINDOW:]) < 0.95 * np.mean(run.losses[:WINDOW])
    assert [c.name for c in run.checkpoints] == ["step_10", "step_20"]
    log = json.loads((run.adapter_dir.parent / "train_log.json").read_text())
    assert log["losses"] == run.losses and log["config"]["adapter"]["kind"] == run.adapter_dir.parent.name[:4]


def test_the_adapter_loads_through_our_loader_and_changes_a_render(run, handler):
    params = GenerationParams(thinking=False, caption="a mid sine tone", duration=6, inference_steps=4)

    def render(adapters=()):
        settings = sampling_settings(params)
        return handler.submit([params], [11], type(settings)(**{**settings.__dict__, "adapters": adapters})
                              ).result().audios[0]

    info = handler.load_lora(str(run.adapter_dir), adapter_name="trained", activate=False)
    try:
        assert (info.format, info.rank, info.alpha, len(info.target_modules)) == ("peft", 4, 8.0, 16)
        assert info.kind == json.loads((run.adapter_dir / "adapter_config.json").read_text())["peft_type"].lower()
        base, tuned = render(), render((("trained", 1.0),))
        assert torch.equal(render(), base) and torch.equal(render((("trained", 1.0),)), tuned)  # same seed, same audio
        assert (tuned - base).abs().max() > 1e-4
    finally:
        handler.unload_lora("trained")


def test_files_and_names_are_upstreams_peft_layout(run):
    layout = json.loads(UPSTREAM["layout"])
    folder = run.adapter_dir
    assert sorted(p.name for p in folder.iterdir()) == layout["files"]
    config = json.loads((folder / "adapter_config.json").read_text())
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        shapes = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
        assert handle.metadata() == layout["metadata"]
    assert (config["task_type"], config["inference_mode"], config["base_model_name_or_path"]) == \
        ("FEATURE_EXTRACTION", True, None)
    assert sorted(config["target_modules"]) == layout["config"]["target_modules"]
    if config["peft_type"] == "LORA":
        assert config.keys() == layout["config"].keys() and shapes == layout["tensors"]
        assert (config["r"], config["lora_alpha"]) == (4, 8)
    else:  # LoKr: the same module names, with peft's Kronecker factors
        modules = {re.sub(r"\.lokr_\w+$", "", n) for n in shapes}
        assert modules == {re.sub(r"\.lora_[AB]\.weight$", "", n) for n in layout["tensors"]}
        assert (config["peft_type"], config["r"], config["alpha"]) == ("LOKR", 4, 8)


def _official_decoder(transformer) -> torch.nn.Module:
    """A module tree under the official names (``layers.N.self_attn.q_proj``...) with the DiT's
    attention projections: what upstream's decoder looks like to peft."""
    root = torch.nn.Module()
    for name, module in transformer.named_modules():
        if re.fullmatch(r"layers\.\d+\.(self|cross)_attn\.(to_q|to_k|to_v|to_out\.0)", name):
            path = unmap_name("transformer", f"{name}.weight").removeprefix("decoder.").removesuffix(".weight")
            parent = root
            for part in path.split(".")[:-1]:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.add_module(path.split(".")[-1], torch.nn.Linear(module.in_features, module.out_features))
    return root


def test_peft_loads_it_onto_upstreams_module_names(run):
    """Upstream's ``load_lora`` is ``PeftModel.from_pretrained(decoder, folder)``: every tensor lands."""
    from peft import PeftModel, get_peft_model_state_dict

    transformer = build_dit_modules(tiny_dit_config("turbo"), device="cpu")["transformer"]
    model = PeftModel.from_pretrained(_official_decoder(transformer), str(run.adapter_dir))
    loaded = get_peft_model_state_dict(model)
    with safe_open(str(run.adapter_dir / "adapter_model.safetensors"), framework="pt") as handle:
        saved = {name: handle.get_tensor(name) for name in handle.keys()}
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def _trainer(demo_root, prepared, **overrides) -> Trainer:
    model = load_for_training(str(demo_root), "acestep-v15-turbo")
    return Trainer(model.transformer, model.null_condition, SampleSet(prepared), _config("lora", **overrides),
                   model.objective)


def test_gradient_checkpointing_trains_the_same_adapter(demo_root, prepared):
    with one_thread():
        plain, checkpointed = (_trainer(demo_root, prepared, gradient_checkpointing=flag) for flag in (False, True))
        for _ in range(2):
            assert plain.train_step() == pytest.approx(checkpointed.train_step(), rel=1e-6)
    for a, b in zip(plain.params, checkpointed.params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_padding_never_enters_the_loss(demo_root, prepared):
    """Songs of 125 and 150 frames share one padded forward; the loss is the mean of each song's own
    loss, as each would have alone (upstream's MSE over the padded batch counts the padding)."""
    model = load_for_training(str(demo_root), "acestep-v15-turbo")
    samples = SampleSet(prepared)
    short, long = sorted((samples[i] for i in range(len(samples))), key=lambda s: s.frames)[:2]
    assert short.frames != long.frames

    def loss(batch, seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        with torch.no_grad():
            return float(flow_matching_loss(model.transformer, model.null_condition,
                                            [s.target_latents for s in batch], [s.encoder_hidden_states for s in batch],
                                            [s.context_latents for s in batch], generators, model.objective))

    together = loss([short, long], [3, 4])
    assert together == pytest.approx((loss([short], [3]) + loss([long], [4])) / 2, rel=1e-5)


def test_a_diffusers_layout_checkpoint_loads_for_training_as_the_official_one(demo_root, tmp_path):
    from acestep.checkpoints.convert import convert_to_diffusers

    repo = convert_to_diffusers(str(demo_root), "acestep-v15-turbo", str(tmp_path / "repo"))
    official, converted = (load_for_training(str(root), name) for root, name in
                           ((demo_root, "acestep-v15-turbo"), (Path(repo).parent, Path(repo).name)))
    assert torch.equal(official.null_condition, converted.null_condition)
    assert official.transformer.state_dict().keys() == converted.transformer.state_dict().keys()
    theirs = converted.transformer.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in official.transformer.state_dict().items())
    assert official.objective.timestep_mu == -0.4 and converted.objective == official.objective
