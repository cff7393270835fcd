"""The studio's "Train an adapter" panel in a real Chromium, the whole loop on the shared app: a
path for a run name refused at its field before anything is sent; two songs with a caption each
uploaded, prepared (Ray Data) and trained for three steps (Ray Train), the step, loss and loss curve
shown, Stop offered while it ran, a reload mid-run following the same run to its end; an export under a taken name refused at its field, then under a new
one, which the model choice offers at once; a song rendered with it through the page differs from the
same seed without it. Over HTTP beside the page: the run's task events carry its losses, the training
status after the run, and the acestep_training_* metrics exported."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.web.conftest import DONE, RECORD_POSTS

pytestmark = pytest.mark.web
STATE = "document.querySelector('#train-form').dataset.state"
ADAPTER = "studio-trained"

# The panel's states in order, and each time the Stop button was shown or hidden.
RECORD_PANEL = """
window.__panel = [];
document.addEventListener('DOMContentLoaded', () => {
  const panel = document.querySelector('#train-form');
  const stop = document.querySelector('#train-stop');
  new MutationObserver(() => {
    const last = window.__panel.at(-1);
    const now = `${panel.dataset.state || ''}${stop.hidden ? '' : '+stop'}`;
    if (now && now !== last) window.__panel.push(now);
  }).observe(panel, {attributes: true, subtree: true, attributeFilter: ['data-state', 'hidden']});
});
"""
# Whether the loss curve's canvas has any ink on it.
INKED = """() => {
  const canvas = document.querySelector('#loss-curve');
  const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  return pixels.some((value, index) => index % 4 === 3 && value > 0);
}"""


@pytest.fixture(scope="module")
def songs(tmp_path_factory):
    """Two short synthetic songs (a tone each, a few seconds)."""
    folder = tmp_path_factory.mktemp("train-songs")
    paths = []
    for name, seconds, pitch in (("low tone.wav", 2.0, 110.0), ("high tone.wav", 3.0, 440.0)):
        t = np.arange(int(seconds * 48000)) / 48000
        tone = 0.3 * np.sin(2 * np.pi * pitch * t)
        sf.write(folder / name, np.stack([tone, tone], axis=1), 48000)
        paths.append(folder / name)
    return paths


@pytest.fixture
def http(studio_app):
    with httpx.Client(base_url=studio_app.url, headers=studio_app.headers, timeout=300) as client:
        yield client


@pytest.fixture
def exported(studio_app):
    """The adapter the test exports, removed afterwards: the shared app's adapter list is other
    modules' fixture too."""
    yield ADAPTER
    shutil.rmtree(Path(studio_app.config.dit.adapters.dir) / ADAPTER, ignore_errors=True)


def _audio(http, audios) -> np.ndarray:
    response = http.get(audios[0]["url"])
    assert response.status_code == 200
    samples, _ = sf.read(io.BytesIO(response.content), dtype="float32", always_2d=True)
    return samples


def _train_from_the_page(page, songs):
    page.get_by_text("Train an adapter").click()
    page.locator("#train-files").set_input_files([str(path) for path in songs])
    page.get_by_label("Caption of low tone.wav").fill("a low tone")
    page.get_by_label("Caption of high tone.wav").fill("a high tone")
    page.get_by_label("Dataset name").fill("studio-tones")
    page.get_by_label("Step count").fill("3")
    # a path for a name is refused at its field before anything is uploaded
    run = page.get_by_label("Run name")
    run.fill("../runs")
    page.get_by_role("button", name="Train", exact=True).click()
    error = page.locator("#train-error")
    assert error.text_content() == "Run name: 1 to 64 letters, digits, '_', '.' or '-' (never a path)"
    assert run.get_attribute("aria-invalid") == "true" and page.evaluate(STATE) is None
    run.fill("studio-run")
    page.get_by_role("button", name="Train", exact=True).click()
    page.wait_for_function("window.__panel.some((seen) => seen.endsWith('+stop'))", timeout=600_000)
    seen = page.evaluate("() => window.__panel")
    assert seen[:3] == ["uploading", "preparing", "starting"], seen
    assert {"starting+stop", "training+stop"} & set(seen), f"Stop was never offered while the run went: {seen}"
    # a reload while it runs: the page picks the key's run up again and follows it to its end
    page.reload()
    page.evaluate("document.getElementById('train').open = true")
    page.wait_for_function(f"['done', 'failed', 'stopped'].includes({STATE})", timeout=600_000)
    assert page.evaluate(STATE) == "done", page.locator("#train-error").text_content()


def _check_the_run_over_http(http, page):
    status = http.get("/v1/training/status").json()["data"]
    assert not status["is_training"] and status["phase"] == "done" and status["current_step"] == 3, status
    assert [point["step"] for point in status["loss_history"]] == [1, 2, 3]
    assert all(np.isfinite(point["loss"]) for point in status["loss_history"])
    lines = http.get(f"/v1/tasks/{status['task_id']}/events").text.splitlines()
    events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    steps = [step for event in events if event["phase"] == "train"
             for step, _ in ((event.get("detail") or {}).get("training") or {}).get("losses", [])]
    assert steps == [1, 2, 3]
    # what the page shows is the run's own step and loss
    assert page.locator("#train-loss").text_content() == f"step 3 of 3 · loss {status['current_loss']:.4f}"
    assert page.locator("#train-bar").evaluate("bar => bar.value") == 1
    assert page.locator("#loss-curve").get_attribute("data-points") == "3" and page.evaluate(INKED)
    assert page.get_by_role("button", name="Stop").is_hidden()


def _export_from_the_page(page, http):
    name = page.get_by_label("Adapter name")
    assert name.input_value() == "studio-run"  # the run's name, until the user picks another
    name.fill("warm")  # the shared app's demo adapter: taken
    page.get_by_role("button", name="Export").click()
    error = page.locator("#train-error")
    error.wait_for(state="visible")
    assert error.text_content().startswith("Adapter name: ") and "exists already" in error.text_content()
    assert name.get_attribute("aria-invalid") == "true"
    name.fill(ADAPTER)
    page.get_by_role("button", name="Export").click()
    page.wait_for_function(f"[...document.querySelectorAll('select[name=lora] option')].some(o => o.value === '{ADAPTER}')")
    assert error.is_hidden()
    listed = {entry["name"]: entry for entry in http.get("/v1/adapters").json()["adapters"]}
    assert listed[ADAPTER]["rank"] == 64 and not listed[ADAPTER].get("error")  # the route's default rank


def _render_from_the_page(page, http):
    """A song with the new adapter through the page and the same request without it over HTTP."""
    page.get_by_label("Caption", exact=True).fill("a slow tone")
    page.get_by_label("Duration (s)").fill("10")
    page.get_by_label("Seed", exact=True).fill("7")
    page.get_by_label("Thinking (the LM plans the song)").uncheck()
    page.get_by_text("Advanced settings").click()
    page.get_by_label("Steps").fill("2")
    page.get_by_label("Adapter (LoRA)").select_option(ADAPTER)
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function(DONE, timeout=300_000)
    (sent,) = page.evaluate("() => window.__posts")
    assert sent["lora"] == ADAPTER and sent["thinking"] is False
    status = http.get(f"/v1/tasks/{page.locator('.card').first.get_attribute('data-task')}").json()
    assert status["result"]["metadata"]["models"]["adapters"] == [[ADAPTER, 1.0]]
    plain = http.post("/v1/generate", json={key: value for key, value in sent.items()
                                            if key not in ("lora", "stream_format")})
    assert plain.status_code == 200, plain.text
    assert plain.json()["metadata"]["models"]["adapters"] == []
    with_adapter, without = _audio(http, status["result"]["audios"]), _audio(http, plain.json()["audios"])
    assert with_adapter.shape == without.shape and np.isfinite(with_adapter).all()
    assert not np.array_equal(with_adapter, without)


def _training_metrics(studio_app):
    """The jobs' acestep_training_* families, once Ray has exported them (a bounded wait)."""
    from tests.serve import app_metrics as observed

    def exported():
        found = observed._scrape(studio_app)
        return found if all(observed._nonzero(found.get(name, [])) for name in observed.TRAINING_FAMILIES) else None

    found = observed._poll(exported, timeout_s=60)
    assert found, sorted(name for name, samples in observed._scrape(studio_app).items() if observed._nonzero(samples))
    return {(labels["job"], labels["outcome"]) for _, labels, value in found["acestep_training_jobs"] if value > 0}


def test_train_export_and_render_with_the_adapter_from_the_page(page, studio_app, songs, http, exported):
    page.add_init_script(RECORD_POSTS)
    page.add_init_script(RECORD_PANEL)
    page.goto("/")
    page.wait_for_function("document.querySelectorAll('select[name=lora] option').length > 1")
    _train_from_the_page(page, songs)
    _check_the_run_over_http(http, page)
    _export_from_the_page(page, http)
    _render_from_the_page(page, http)
    assert {("dataset", "done"), ("training", "done")} <= _training_metrics(studio_app)
