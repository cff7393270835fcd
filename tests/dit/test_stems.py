"""Stems: several tracks of one source in one extract / lego call (``GenerationParams.tracks``).
The source is VAE-encoded once (the worker's counter), the tracks share DiT forwards (the worker's
``items_per_forward``), and each stem equals its solo single-track run with the same seed."""

from __future__ import annotations

import pytest
import torch

from acestep.dit import vae as vae_ops
from acestep.dit.batch import DiTLimits
from acestep.dit.items import PostProcess
from acestep.dit.running import RunningBatch
from acestep.dit.tasks import TRACK_NAMES, task_instruction
from acestep.handler import AceStepHandler
from acestep.inference import GenerationConfig, GenerationParams, generate_music
from acestep.stems import ALL_TRACKS, MIXES, TRACK_PRESETS, track_names
from acestep.validation import ValidationError, validate
from tests.conftest import write_tone

STEPS = 4
ATOL = 1e-4  # fp32 rounding: shared forwards against solo ones


@pytest.fixture(scope="module")
def stems_handler(base_handler):
    """The demo base DiT behind a worker whose forwards hold 24 rows: twelve guided tracks at once."""
    handler = AceStepHandler.from_bundle(base_handler.bundle, DiTLimits(max_forward_rows=24))
    yield handler
    handler.loop.close()


@pytest.fixture(scope="module")
def short_source(tmp_path_factory):
    return write_tone(tmp_path_factory.mktemp("stems") / "short.wav", 6.0, freq=180.0)


def _render(handler, src, seeds, **fields):
    params = GenerationParams(**{"task_type": "extract", **fields}, src_audio=src, inference_steps=STEPS,
                              thinking=False)
    result = generate_music(handler, None, params,
                            GenerationConfig(batch_size=len(seeds), seeds=list(seeds), use_random_seed=False))
    assert result.success, result.error
    return result


def _solo(handler, src, track, seeds, **fields):
    """The official single-track request: the track named by the instruction, no ``tracks``."""
    task = fields.pop("task_type", "extract")
    return _render(handler, src, seeds, task_type=task, instruction=task_instruction(task, [track]), **fields)


def _delta(after, before):
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def _solo_latents(handler, items, settings):
    """Each prepared item sampled alone (no decode): its final latents."""
    out = []
    for item in items:
        batch = RunningBatch(handler.bundle, DiTLimits(max_forward_rows=2))
        track = batch.track(item, settings)
        while batch.has_work:
            batch.step()
        out.append(track.x)
    return out


def test_twelve_tracks_of_a_30s_source_come_back_from_one_call_and_match_their_solo_runs(stems_handler, tmp_path):
    from acestep.dit.prepare import sampling_settings

    src = write_tone(tmp_path / "song.wav", 30.0)
    before = stems_handler.stats()
    result = _render(stems_handler, src, [7], tracks="all")
    after = stems_handler.stats()

    assert [a["track"] for a in result.audios] == list(ALL_TRACKS) == result.extra_outputs["tracks"]
    assert sorted(ALL_TRACKS) == sorted(TRACK_NAMES)
    for audio in result.audios:
        assert audio["params"]["track"] == audio["track"] and audio["params"]["seed"] == 7
        assert audio["params"]["instruction"] == task_instruction("extract", [audio["track"]])
        assert audio["tensor"].shape == (2, 30 * 48000)
    assert len({a["key"] for a in result.audios}) == 12
    assert _delta(after["vae_encodes"], before["vae_encodes"]) == {"source": 1}  # one encode for twelve tracks
    assert _delta(after["items_per_forward"], before["items_per_forward"]) == {12: STEPS}  # all twelve, every step

    # every track's sampling alone gives its stem's latents
    items = [GenerationParams(task_type="extract", src_audio=src, inference_steps=STEPS,
                              instruction=task_instruction("extract", [t])) for t in ALL_TRACKS]
    prepared = stems_handler.prepare(items, [7] * 12)
    for k, x in enumerate(_solo_latents(stems_handler, prepared, sampling_settings(items[0]))):
        assert torch.allclose(result.extra_outputs["latents"][k], x.cpu(), atol=ATOL), ALL_TRACKS[k]
    # and whole solo requests (their own encode and decode) give the first and the last stem's audio
    for k in (0, 11):
        solo = _solo(stems_handler, src, ALL_TRACKS[k], [7])
        assert torch.allclose(solo.audios[0]["tensor"], result.audios[k]["tensor"], atol=ATOL), ALL_TRACKS[k]


def test_batch_size_counts_songs_per_track_in_track_order(stems_handler, short_source):
    before = stems_handler.stats()["vae_encodes"]["source"]
    result = _render(stems_handler, short_source, [3, 9], tracks=["drums", "Bass"])
    assert stems_handler.stats()["vae_encodes"]["source"] - before == 1
    assert [(a["track"], a["params"]["seed"]) for a in result.audios] == [
        ("drums", 3), ("drums", 9), ("bass", 3), ("bass", 9)]
    for k, track in ((0, "drums"), (3, "bass")):
        solo = _solo(stems_handler, short_source, track, [3, 9])
        assert torch.allclose(solo.audios[k % 2]["tensor"], result.audios[k]["tensor"], atol=ATOL)


def test_lego_takes_tracks_too(stems_handler, short_source):
    window = dict(task_type="lego", repainting_start=1.0, repainting_end=4.0)
    result = _render(stems_handler, short_source, [5], tracks="guitar,strings", **window)
    assert [a["track"] for a in result.audios] == ["guitar", "strings"]
    solo = _solo(stems_handler, short_source, "strings", [5], **window)
    assert solo.audios[0]["params"]["instruction"] == result.audios[1]["params"]["instruction"]
    assert torch.allclose(solo.audios[0]["tensor"], result.audios[1]["tensor"], atol=ATOL)


def test_vocals_plus_accompaniment_is_the_vocals_stem_and_the_sum_of_the_other_eleven(stems_handler, short_source):
    before = stems_handler.stats()["vae_encodes"]["source"]
    dual = _render(stems_handler, short_source, [4], tracks="vocals+accompaniment")
    assert stems_handler.stats()["vae_encodes"]["source"] - before == 1
    assert [a["track"] for a in dual.audios] == ["vocals", "accompaniment"]
    assert MIXES["accompaniment"] == tuple(t for t in ALL_TRACKS if t != "vocals")
    vocals = _solo(stems_handler, short_source, "vocals", [4])
    assert torch.allclose(vocals.audios[0]["tensor"], dual.audios[0]["tensor"], atol=ATOL)
    # the eleven other tracks, unnormalised, summed, then post-processed as one audio
    parts = _render(stems_handler, short_source, [4], tracks=list(MIXES["accompaniment"]), enable_normalization=False)
    raw = [a["tensor"] for a in parts.audios]
    accompaniment = dual.audios[1]["tensor"]

    def error(candidate):
        return float((vae_ops.postprocess(candidate, PostProcess()) - accompaniment).abs().max())

    right = error(sum(raw))
    assert right < 1e-5
    # the demo model's tracks differ little, so the test also asks that the rule fits far better than
    # its near misses: a sum of normalised parts, or any one part alone
    near_misses = [sum(vae_ops.postprocess(part, PostProcess()) for part in raw)] + raw + [dual.audios[0]["tensor"]]
    assert all(right * 10 < error(candidate) for candidate in near_misses)
    assert accompaniment.abs().max() == pytest.approx(10 ** (-1 / 20), abs=1e-4)  # normalised once, as a whole


@pytest.mark.parametrize("value, names", [
    ("all", ALL_TRACKS), ("vocals+accompaniment", ("vocals", "accompaniment")),
    (" Vocals , drums", ("vocals", "drums")), (["bass"], ("bass",)), (("fx", "accompaniment"), ("fx", "accompaniment")),
])
def test_track_names(value, names):
    assert track_names(value) == names
    assert set(TRACK_PRESETS["all"]) == set(TRACK_NAMES)


def _checked(**fields):
    validate(GenerationParams(**{"task_type": "extract", "src_audio": "song.wav", **fields}), GenerationConfig())


@pytest.mark.parametrize("value, why", [
    (["vocals", "theremin"], "entry 1 is not one of the names"), ("vocals,vocals", "entry 1 repeats 'vocals'"),
    ([], "1 to 13 names"), (5, "a string or a list"), (["vocals", 3], "entry 1 is not"), ("", "entry 0 is not"),
    (list(ALL_TRACKS) + ["accompaniment", "fx"], "1 to 13 names"),
])
def test_a_bad_tracks_entry_is_refused_naming_tracks_and_the_allowed_names(value, why):
    with pytest.raises(ValidationError) as caught:
        _checked(tracks=value)
    assert caught.value.field == "tracks"
    assert why in caught.value.allowed
    assert all(name in caught.value.allowed for name in ALL_TRACKS + ("accompaniment", "all", "vocals+accompaniment"))


@pytest.mark.parametrize("fields, field, allowed", [
    (dict(task_type="complete"), "tracks", "null unless task_type is extract or lego"),
    (dict(task_type="cover"), "tracks", "null unless task_type is extract or lego"),
    (dict(task_type="text2music", src_audio=None), "tracks", "null unless task_type is extract or lego"),
    (dict(task_type="lego", tracks="vocals+accompaniment"), "tracks", "accompaniment only with task_type extract"),
    (dict(instruction="Extract the DRUMS track from the audio:"), "instruction", "the default when tracks is set"),
])
def test_tracks_need_extract_or_lego_and_leave_the_instruction_to_them(fields, field, allowed):
    with pytest.raises(ValidationError) as caught:
        _checked(**{"tracks": ["drums"], **fields})
    assert caught.value.field == field and allowed in caught.value.allowed


def test_the_default_instructions_and_lego_tracks_pass():
    for instruction in ("", GenerationParams.instruction, "Extract the track from the audio:"):
        _checked(tracks="all", instruction=instruction)
    _checked(task_type="lego", tracks=["drums", "bass"])
