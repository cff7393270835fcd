"""Items of different lengths, captions, tasks and steps share DiT forwards (padding + masks) and
get their solo results: latents within 1e-5 (fp32, demo checkpoints)."""

from __future__ import annotations

import pytest
import torch

from acestep.dit import vae as vae_ops
from acestep.dit.prepare import sampling_settings
from acestep.dit.batch import forward_groups
from acestep.dit.running import RunningBatch
from acestep.params import GenerationParams
from tests.dit.conftest import ONE_FORWARD

TOL = 1e-5




def _items(handler, specs, source_audio=None):
    params = []
    for spec in specs:
        spec = dict(spec)
        if spec.get("task_type") in ("cover", "repaint"):
            spec["src_audio"] = source_audio
        params.append(GenerationParams(thinking=False, **spec))
    return handler.prepare(params, [100 + i for i in range(len(specs))]), sampling_settings(params[0])


def _sample(handler, items, settings, limits=ONE_FORWARD):
    """Sampled latents of ``items`` run together on a fresh running batch (the handler's worker
    runs the same batch; the VAE decode after it does not change the latents), and that batch."""
    batch = RunningBatch(handler.bundle, limits)
    tracks = [batch.track(item, settings) for item in items]
    while batch.has_work:
        batch.step()
    return [track.x for track in tracks], batch


def _solo(handler, item, settings):
    return _sample(handler, [item], settings)[0][0]


def _assert_solo(handler, items, settings, together, solos=None):
    """``together``: latents [T_i, C] per item; ``solos``: their solo runs, computed when None."""
    for b, item in enumerate(items):
        solo = solos[b] if solos is not None else _solo(handler, item, settings)
        diff = (together[b][: item.frames] - solo).abs().max()
        assert diff <= TOL, f"item {b} ({item.frames} frames) differs from its solo run by {diff}"


def _latents(output, items):
    return [output.latents[b, : item.frames] for b, item in enumerate(items)]


MIXED = [{"caption": "a", "duration": 10},
         {"caption": "a far longer caption about strings, brass and a choir over thunder", "duration": 30,
          "lyrics": "[verse]\nla la la\n[chorus]\noh oh oh"},
         {"caption": "lofi beat", "duration": 47}]


@pytest.fixture(scope="module")
def mixed_solos(turbo_mixer):
    """MIXED's solo latents on the turbo DiT (every test below renders MIXED with the same seeds)."""
    items, settings = _items(turbo_mixer, MIXED)
    return [_solo(turbo_mixer, item, settings) for item in items]


def test_mixed_durations_and_captions_equal_their_solo_runs(turbo_mixer, mixed_solos):
    items, settings = _items(turbo_mixer, MIXED)
    assert len({i.frames for i in items}) == 3
    before = turbo_mixer.stats()["items_per_forward"].get(3, 0)
    together = turbo_mixer.render_items(items, settings)
    assert turbo_mixer.stats()["items_per_forward"][3] == before + settings.steps  # one forward per step
    _assert_solo(turbo_mixer, items, settings, _latents(together, items), mixed_solos)
    for item, audio in zip(items, together.audios):  # cropped back to each item's own length
        assert audio.shape[-1] == item.frames * vae_ops.HOP


def test_cover_and_repaint_share_a_batch_with_text2music(turbo_mixer, source_audio):
    specs = [MIXED[0], {"task_type": "cover", "caption": "rework", "audio_cover_strength": 0.5},
             {"task_type": "repaint", "caption": "fill", "repainting_start": 2.0, "repainting_end": 6.0},
             MIXED[2]]
    items, settings = _items(turbo_mixer, specs, source_audio)
    settings = type(settings)(**{**settings.__dict__, "cover_strength": 0.5})
    together, batch = _sample(turbo_mixer, items, settings)
    assert batch.items_per_forward == {4: settings.steps}  # all four in every forward
    _assert_solo(turbo_mixer, items, settings, together)


@pytest.mark.parametrize("use_adg", [False, True])
def test_guided_base_model_rows_keep_their_own_guidance(base_mixer, use_adg):
    specs = [{**spec, "inference_steps": 6, "guidance_scale": 4.0, "shift": 3.0, "use_adg": use_adg,
              "cfg_interval_start": 0.1, "cfg_interval_end": 0.9} for spec in MIXED]
    items, settings = _items(base_mixer, specs)
    together, batch = _sample(base_mixer, items, settings)
    assert batch.items_per_forward == {3: settings.steps}
    _assert_solo(base_mixer, items, settings, together)


def test_an_item_joining_at_step_3_equals_its_solo_run(turbo_mixer, mixed_solos):
    items, settings = _items(turbo_mixer, MIXED[:2])
    batch = RunningBatch(turbo_mixer.bundle, ONE_FORWARD)
    first = batch.track(items[0], settings)
    for _ in range(3):
        batch.step()
    assert first.step == 3
    second = batch.track(items[1], settings)
    while batch.has_work:
        batch.step()
    assert batch.items_per_forward == {1: 6, 2: 5}  # 3 alone, 5 shared, then the second's last 3 alone
    _assert_solo(turbo_mixer, items, settings, [first.x, second.x], mixed_solos)


# the default window and budget; then 256-frame windows with tiles of several items in one call
@pytest.mark.parametrize("window, budget", [(None, None), (256, 1024)])
def test_batched_vae_decode_equals_per_item_decode(turbo_handler, window, budget):
    vae = turbo_handler.bundle.vae
    generator = torch.Generator().manual_seed(0)
    latents = [torch.randn(frames, vae.config.decoder_input_channels, generator=generator)
               for frames in (250, 300, 450)]
    together = vae_ops.decode_batch(vae, latents, window, budget=budget)
    for x, audio in zip(latents, together):
        alone = vae_ops.decode(vae, x.unsqueeze(0), window=window)[0]
        assert audio.shape == alone.shape and (audio - alone).abs().max() <= TOL


def test_forward_groups_bound_the_padding_of_each_forward():
    assert forward_groups([250, 750, 1175], 100.0) == [[2, 1, 0]]
    assert forward_groups([250, 750, 1175], 0.25) == [[2, 1], [0]]  # 2 x 1176 <= 1.25 x 1925; 3 x 1176 is not
    songs = [600, 550, 500, 450, 400, 350, 300, 250]  # 24 s down to 10 s
    groups = forward_groups(songs, 0.25)
    assert sorted(i for g in groups for i in g) == list(range(8)) and len(groups) == 2
    for group in groups:
        padded = len(group) * max(songs[i] for i in group)
        assert padded <= 1.25 * sum(songs[i] for i in group)


def test_default_limits_split_very_different_lengths_and_still_equal_solo_runs(turbo_handler, mixed_solos):
    items, settings = _items(turbo_handler, MIXED)
    before = dict(turbo_handler.stats()["items_per_forward"])
    together = turbo_handler.render_items(items, settings)
    after = turbo_handler.stats()["items_per_forward"]
    # per step: 47 s and 30 s in one forward, 10 s alone (it would more than double its padding)
    assert [after.get(k, 0) - before.get(k, 0) for k in (1, 2, 3)] == [settings.steps, settings.steps, 0]
    _assert_solo(turbo_handler, items, settings, _latents(together, items), mixed_solos)
