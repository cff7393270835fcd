"""The studio's source tasks in a real Chromium: a cover from an uploaded WAV (sent as multipart,
rendered, its result reused as the next source and extended from its card), a repaint whose window is dragged on the source
waveform, stems of one source in one view (mute, solo, play together, one zip), tasks the chosen
DiT cannot serve shown disabled with the reason, expired history entries, and the page at phone
width."""

from __future__ import annotations

import io
import json
import zipfile

import httpx
import numpy as np
import pytest
import soundfile as sf

from acestep.dit.tasks import TASK_TYPES, TRACK_NAMES, task_instruction
from tests.web.conftest import DONE

pytestmark = pytest.mark.web
# The finished song's player (the live one, playing while it rendered, gives way to it).
PLAYABLE = ("document.querySelector('.card figure:not(.live) audio') && "
            "document.querySelector('.card figure:not(.live) audio').duration > 0")
# the newest card's own file playable (PLAYABLE would also pass on an older card's)
NEWEST_PLAYABLE = ("(() => { const a = document.querySelector('.card').querySelector('figure:not(.live) audio'); "
                   "return !!a && a.duration > 0; })()")


@pytest.fixture(scope="module")
def source_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("sources") / "source.wav"
    t = np.arange(12 * 48000) / 48000
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 0.5 * t)) / 2
    sf.write(path, np.stack([tone, tone], axis=1), 48000)
    return path


def _open(page):
    page.goto("/")
    page.wait_for_function(f"document.querySelectorAll('input[name=task_type]').length === {len(TASK_TYPES)}")


# What the page hands to fetch for POST /v1/tasks: the "request" part and the file part names of its
# FormData (read in the page: a network capture does not always carry a multipart body with files).
RECORD_UPLOADS = """
const original = window.fetch;
window.__uploads = [];
window.fetch = (url, options = {}) => {
  if (String(url).endsWith('/v1/tasks') && options.body instanceof FormData) {
    window.__uploads.push({request: JSON.parse(options.body.get('request')),
                           files: [...options.body.keys()].filter(k => k !== 'request')});
  }
  return original(url, options);
};
"""


def _recording(page):
    page.add_init_script(RECORD_UPLOADS)


def _uploads(page):
    return page.evaluate("() => window.__uploads")


def _rendered_params(page, studio_app) -> dict:
    """The params the server rendered the newest card's task with."""
    task_id = page.locator(".card").first.get_attribute("data-task")
    status = httpx.get(f"{studio_app.url}/v1/tasks/{task_id}", headers=studio_app.headers, timeout=30).json()
    return status["result"]["audios"][0]["params"]


def _upload_source(page, path):
    page.locator("#src_audio").set_input_files(str(path))
    page.wait_for_function("document.querySelector('#src-wave').dataset.duration > 11")


def _fast(page):
    page.get_by_text("Advanced settings").click()
    page.get_by_label("Steps").fill("2")


def test_tasks_the_chosen_dit_cannot_serve_are_disabled_with_the_reason(page, studio_app):
    _open(page)
    for task in ("lego", "extract", "complete"):  # the app sends them to its base DiT
        assert page.locator(f"input[name=task_type][value={task}]").is_enabled()
    page.get_by_label("DiT model").select_option("acestep-v15-turbo")
    page.wait_for_function("document.querySelector('input[name=task_type][value=extract]').disabled")
    for task in ("lego", "extract", "complete"):
        radio = page.locator(f"input[name=task_type][value={task}]")
        assert radio.is_disabled()
        reason = page.locator(f"#why-{task}").text_content()
        assert "base" in reason and task in reason and "acestep-v15-turbo is turbo" in reason
    assert page.locator("#source").is_hidden()
    page.locator("input[name=task_type][value=repaint]").check()
    assert page.locator("#source").is_visible() and page.get_by_label("Window start (s)").is_visible()
    assert page.get_by_label("Cover strength").is_hidden()
    page.locator("input[name=task_type][value=cover]").check()
    assert page.get_by_label("Cover strength").is_visible() and page.get_by_label("Window start (s)").is_hidden()


def _start(page, task, source_wav, caption):
    """The page open on ``task`` with the source uploaded, a caption, 2 steps, 10 s."""
    _recording(page)
    _open(page)
    page.locator(f"input[name=task_type][value={task}]").check()
    _upload_source(page, source_wav)
    page.get_by_label("Caption", exact=True).fill(caption)
    page.get_by_label("Duration (s)").fill("10")
    _fast(page)


def test_a_cover_from_an_uploaded_wav_its_result_as_the_next_source_and_extended(page, source_wav, studio_app):
    _start(page, "cover", source_wav, "jazz cover with brushed drums")
    page.get_by_label("Cover strength").fill("0.5")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function(DONE, timeout=300_000)
    page.wait_for_function(PLAYABLE, timeout=60_000)
    (upload,) = _uploads(page)
    sent = upload["request"]
    assert sent["task_type"] == "cover" and sent["audio_cover_strength"] == 0.5
    assert "repainting_start" not in sent  # a field of another task is not sent
    assert upload["files"] == ["src_audio"]
    params = _rendered_params(page, studio_app)
    assert (params["task_type"], params["audio_cover_strength"]) == ("cover", 0.5)
    card = page.locator(".card").first
    page.wait_for_function("document.querySelector('.card canvas.wave').dataset.drawn === '1'")
    card.get_by_role("button", name="Use as source").first.click()
    page.wait_for_function("document.querySelector('#src-info').textContent.includes('.flac')")
    assert page.locator("input[name=task_type][value=cover]").is_checked()
    assert page.locator("#src_audio").evaluate("i => i.files[0].name").endswith(".flac")

    # extend the same result from its card: 3 s more to the right
    cover_s = card.locator("audio").first.evaluate("a => a.duration")
    card.get_by_role("button", name="Extend").first.click()
    page.wait_for_function("document.querySelector('input[name=task_type][value=extend]').checked")
    right = page.get_by_label("Extend right (s)")
    assert right.is_visible() and right.input_value() == "30"  # the studio's first suggestion
    right.fill("3")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("document.querySelectorAll('.card').length === 2 && " + DONE, timeout=300_000)
    page.wait_for_function(NEWEST_PLAYABLE, timeout=60_000)
    sent = _uploads(page)[-1]
    assert sent["request"]["task_type"] == "extend" and sent["request"]["extend_right_s"] == 3
    assert sent["files"] == ["src_audio"]
    extended_s = page.locator(".card").first.locator("audio").first.evaluate("a => a.duration")
    assert abs(extended_s - (cover_s + 3)) < 0.05, (cover_s, extended_s)


def test_a_repaint_with_the_window_dragged_on_the_waveform(page, source_wav, studio_app):
    _start(page, "repaint", source_wav, "a soft piano bridge")
    wave = page.locator("#src-wave")
    wave.scroll_into_view_if_needed()  # the mouse acts in the viewport
    box = wave.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.25, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, y, steps=6)
    page.mouse.up()
    start = float(page.get_by_label("Window start (s)").input_value())
    end = float(page.get_by_label("Window end (s, -1 = end)").input_value())
    assert abs(start - 3.0) <= 0.2 and abs(end - 7.2) <= 0.2, (start, end)  # 25 % and 60 % of 12 s
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function(DONE, timeout=300_000)
    page.wait_for_function(PLAYABLE, timeout=60_000)
    (upload,) = _uploads(page)
    sent = upload["request"]
    assert sent["task_type"] == "repaint" and (sent["repainting_start"], sent["repainting_end"]) == (start, end)
    assert "audio_cover_strength" not in sent and upload["files"] == ["src_audio"]
    params = _rendered_params(page, studio_app)  # the server rendered that window
    assert (params["task_type"], params["repainting_start"], params["repainting_end"]) == ("repaint", start, end)


def test_track_names_become_the_official_instruction(page):
    _open(page)
    # complete is disabled on this app; enable its radio in the page to read what the form would send
    page.evaluate("""() => { const r = document.querySelector('input[name=task_type][value=complete]');
                             r.disabled = false; r.click(); }""")
    for name in ("drums", "bass"):
        page.locator(f"input[name=track][value={name}]").check()
    sent = page.evaluate("() => import('/studio/tasks.js').then(m => m.taskFields())")
    chosen = [name for name in TRACK_NAMES if name in ("drums", "bass")]  # the form lists them in this order
    assert sent == {"task_type": "complete", "instruction": task_instruction("complete", chosen)}
    assert sent["instruction"] == "Complete the input track with BASS | DRUMS:"


def test_history_shows_expired_results_as_expired(browser, studio_app):
    context = browser.new_context(base_url=studio_app.url)
    gone = [{"task_id": "0" * 32, "caption": "an old song", "phase": "done", "at": 0}]
    context.add_init_script(f"localStorage.setItem('acestep.apiKey', {studio_app.keys['default']!r});"
                            f"if (!localStorage.getItem('acestep.history')) localStorage.setItem('acestep.history', {json.dumps(json.dumps(gone))});")
    page = context.new_page()
    try:
        page.goto("/")
        page.wait_for_function("document.querySelector('#history li') && document.querySelector('#history li').dataset.phase === 'expired'")
        item = page.locator("#history li").first
        assert "expired" in item.text_content() and "an old song" in item.text_content()
        item.get_by_role("button").click()
        card = page.locator(".card").first
        assert card.get_attribute("data-phase") == "expired" and "expired" in card.locator(".phase").text_content()
    finally:
        context.close()


def test_the_page_fits_a_phone(browser, studio_app):
    context = browser.new_context(base_url=studio_app.url, viewport={"width": 390, "height": 844}, is_mobile=True)
    context.add_init_script(f"localStorage.setItem('acestep.apiKey', {studio_app.keys['default']!r});")
    page = context.new_page()
    try:
        _open(page)
        page.locator("input[name=task_type][value=repaint]").check()
        overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{overflow}px wider than the phone"
        for label in ("Caption", "Window start (s)", "Generate"):
            target = page.get_by_role("button", name=label) if label == "Generate" else page.get_by_label(label, exact=True)
            box = target.bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, (label, box)
    finally:
        context.close()


def test_stems_come_back_as_one_view_per_song_with_mute_solo_and_a_zip(page, source_wav, studio_app, tmp_path):
    _start(page, "extract", source_wav, "")
    for name in ("vocals", "drums"):
        page.locator(f"input[name=track][value={name}]").check()
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function(DONE, timeout=300_000)
    page.wait_for_function("document.querySelectorAll('.stem canvas.wave[data-drawn]').length === 4", timeout=60_000)
    (upload,) = _uploads(page)
    assert upload["request"]["tracks"] == ["drums", "vocals"] and "instruction" not in upload["request"]
    views = page.locator(".stems")
    assert views.count() == 2  # the form's default batch: two songs, each its own stems
    song = views.first
    assert "Song 1" in song.locator("h4").text_content()
    assert [song.locator(".stem").nth(k).get_attribute("data-track") for k in range(2)] == ["drums", "vocals"]
    audible = "s => [...s.querySelectorAll('.stem')].map(r => r.dataset.track + ':' + !r.querySelector('audio').muted)"
    song.get_by_role("button", name="Solo vocals").click()
    assert song.evaluate(audible) == ["drums:false", "vocals:true"]
    song.get_by_role("button", name="Solo vocals").click()
    song.get_by_role("button", name="Mute vocals").click()
    assert song.evaluate(audible) == ["drums:true", "vocals:false"]
    assert views.nth(1).evaluate(audible) == ["drums:true", "vocals:true"]  # the other song is its own
    song.get_by_role("button", name="Play all").click()
    page.wait_for_function("[...document.querySelector('.stems').querySelectorAll('audio')].every(a => !a.paused)")
    song.get_by_role("button", name="Pause").click()
    with page.expect_download() as download:
        song.get_by_role("button", name="Download all (zip)").click()
    path = tmp_path / "stems.zip"
    download.value.save_as(path)
    with zipfile.ZipFile(path) as bundle:
        names = bundle.namelist()
        assert [name.rsplit(".", 1)[0] for name in names] == ["01-drums", "02-drums", "03-vocals", "04-vocals"]
        for name in names:
            audio, rate = sf.read(io.BytesIO(bundle.read(name)))
            assert rate == 48000 and audio.shape == (12 * 48000, 2)  # the source's length
