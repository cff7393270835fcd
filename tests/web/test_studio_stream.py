"""The studio plays a song while it renders: its request asks for an MP3 stream, the card's live
player (MediaSource fed by the task's stream, fetched with the key) starts playing before the task is
done, and once it is done the stored file takes the live player's place."""

from __future__ import annotations

import pytest

from tests.web.conftest import DONE

pytestmark = pytest.mark.web

# Each time a live player starts playing: the task's phase on the server right then, and where the
# player is. The fetch starts after the event, so a phase short of done proves playback came first.
RECORD_PLAYING = """
window.__playing = [];
window.__requests = [];
const original = window.fetch;
window.fetch = (url, options = {}) => {
  if (String(url).endsWith('/v1/tasks') && typeof options.body === 'string') {
    window.__requests.push(JSON.parse(options.body));
  }
  return original(url, options);
};
document.addEventListener('playing', async (event) => {
  const audio = event.target;
  if (!audio.classList.contains('live')) return;
  const task = audio.closest('.card').dataset.task;
  const key = localStorage.getItem('acestep.apiKey');
  const status = await (await original(`/v1/tasks/${task}`, {headers: {Authorization: `Bearer ${key}`}})).json();
  window.__playing.push({phase: status.phase, received: Number(audio.dataset.received || 0)});
}, true);
"""


def test_a_60s_song_plays_while_it_renders_then_the_file_takes_over(page):
    page.add_init_script(RECORD_PLAYING)
    page.goto("/")
    page.wait_for_function("document.querySelector('[name=inference_steps]').value !== ''")
    page.get_by_label("Caption", exact=True).fill("slow ambient pads")
    page.get_by_label("Duration (s)").fill("60")
    page.get_by_text("Advanced settings").click()
    page.get_by_label("Steps").fill("2")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("window.__playing.length > 0", timeout=300_000)
    assert page.evaluate("() => window.__requests")[0]["stream_format"] == "mp3"
    first = page.evaluate("() => window.__playing[0]")
    assert first["phase"] in ("dit", "encode"), f"playback started when the task was {first['phase']}"
    assert first["received"] > 0
    page.wait_for_function(DONE, timeout=300_000)
    page.wait_for_function("!document.querySelector('.card figure.live')", timeout=120_000)
    player = page.locator(".card figure audio").first
    page.wait_for_function("document.querySelector('.card figure audio').duration > 0", timeout=60_000)
    assert abs(player.evaluate("a => a.duration") - 60.0) < 0.5
