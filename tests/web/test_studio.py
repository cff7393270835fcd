"""The studio page in a real Chromium: text2music end to end (form → LM and DiT progress → an
audio element that plays → a download soundfile reads), the server's 4xx next to its field, the
history across a reload, and a screenshot of a finished generation."""

from __future__ import annotations

import io

import pytest
import soundfile as sf

from tests.web.conftest import ARTIFACTS, DONE

pytestmark = pytest.mark.web


def _open(page):
    page.goto("/")
    page.wait_for_function("document.querySelector('[name=inference_steps]').value !== ''")  # schema applied


def _fill_song(page, caption="warm lofi beat with soft keys"):
    page.get_by_label("Caption", exact=True).fill(caption)
    page.get_by_label("Duration (s)").fill("10")
    page.get_by_text("Advanced settings").click()
    page.get_by_label("Steps").fill("2")


def test_the_form_takes_defaults_and_ranges_from_the_schema(page):
    _open(page)
    bpm = page.get_by_label("BPM")
    assert bpm.get_attribute("min") == "30" and bpm.get_attribute("max") == "300"
    assert page.get_by_label("Steps").input_value() == "8"
    assert page.get_by_label("Format").input_value() == "flac"


# Every value each card's progress bars take, in order (a bar's value property reflects to its
# attribute, so an observer sees each update the page makes).
RECORD_BARS = """
window.__bars = {LM: [], DiT: []};
new MutationObserver((changes) => {
  for (const change of changes) {
    const bar = change.target;
    if (bar.tagName === 'PROGRESS') window.__bars[bar.parentElement.firstChild.textContent].push(bar.value);
  }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ['value']});
"""


def test_text2music_end_to_end(page, tmp_path):
    page.add_init_script(RECORD_BARS)
    _open(page)
    _fill_song(page)
    page.get_by_label("Thinking (the LM plans the song)").check()
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function(DONE, timeout=300_000)
    card = page.locator(".card").first
    seen = card.get_attribute("data-seen").split(",")
    assert {"lm", "dit", "done"} <= set(seen), seen
    assert card.locator("progress").nth(0).evaluate("p => p.value") == 1
    assert card.locator("progress").nth(1).evaluate("p => p.value") == 1
    bars = page.evaluate("() => window.__bars")
    for name, values in bars.items():  # each bar moved: a value between empty and full on the way
        assert any(0 < value < 1 for value in values) and values[-1] == 1, (name, values)
    page.wait_for_function("document.querySelector('.card figure:not(.live) audio') && "
                           "document.querySelector('.card figure:not(.live) audio').duration > 0", timeout=60_000)
    assert "bpm" in card.locator(".plan").text_content()
    with page.expect_download() as download:
        card.get_by_role("link", name="Download flac").first.click()
    path = tmp_path / "song.flac"
    download.value.save_as(path)
    data, rate = sf.read(io.BytesIO(path.read_bytes()), always_2d=True)
    assert rate == 48000 and data.shape[1] == 2 and abs(data.shape[0] / rate - 10.0) < 0.5
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "studio.png"), full_page=True)
    # the history survives a reload
    page.reload()
    entry = page.locator("#history li").first
    entry.wait_for()
    page.wait_for_function("document.querySelector('#history li').textContent.includes('done')")
    assert "warm lofi beat" in entry.text_content()


def test_a_4xx_shows_the_servers_message_next_to_the_field_and_starts_nothing(page):
    posted = []
    page.on("response", lambda r: posted.append(r.status) if r.url.endswith("/v1/tasks") else None)
    _open(page)
    _fill_song(page)
    page.get_by_label("BPM").fill("9999")
    page.get_by_role("button", name="Generate").click()
    message = page.locator(".field-error")
    message.wait_for()
    assert "bpm" in message.text_content() and "300" in message.text_content()
    assert page.get_by_label("BPM").get_attribute("aria-invalid") == "true"
    assert posted == [422] and page.locator(".card").count() == 0


def test_without_a_key_the_page_says_so(browser, studio_app):
    context = browser.new_context(base_url=studio_app.url)
    page = context.new_page()
    try:
        page.goto("/studio")
        note = page.locator(".field-error")
        note.wait_for()
        assert "API key" in note.text_content()
        assert page.get_by_label("API key").get_attribute("aria-invalid") == "true"
    finally:
        context.close()
