"""The studio's sampler, DCW, repaint, cover and output controls in a real Chromium: what the page
sends for them (JSON types, fields left at their default absent), the task and format lists as the
server offers them, and a served model's preset as the defaults of the fields it names. The
requests are read as the browser sends them and stopped there: these tests check the page, the
server's handling of the fields has its own tests."""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from acestep.audio import AUDIO_FORMATS
from acestep.dit.tasks import TASK_TYPES
from acestep.params import GenerationParams

pytestmark = pytest.mark.web
COVER_TASKS = [task for task in TASK_TYPES if task.startswith("cover")]
# A second served DiT with a preset whose values all differ from the schema's defaults.
XL_PRESET = {"inference_steps": 32, "shift": 2.5, "guidance_scale": 5.0, "sampler_mode": "heun", "dcw_enabled": False}


def _stop_posts(page):
    """POST /v1/tasks ends in the browser: the page builds and sends it, the server never renders it."""
    page.route("**/v1/tasks", lambda route: route.abort() if route.request.method == "POST" else route.continue_())


def _open(page):
    page.goto("/")
    page.wait_for_function(f"document.querySelectorAll('input[name=task_type]').length === {len(TASK_TYPES)}"
                           " && document.querySelector('[name=inference_steps]').value !== ''")


def _sent(page) -> dict:
    """The JSON body of the next POST /v1/tasks the Generate button makes."""
    with page.expect_request(lambda r: r.url.endswith("/v1/tasks") and r.method == "POST") as posted:
        page.get_by_role("button", name="Generate").click()
    return posted.value.post_data_json


def _task(page, name):
    """Pick ``name``; a task this app cannot serve is enabled in the page to read what it would send."""
    page.evaluate("""(name) => { const r = document.querySelector(`input[name=task_type][value="${name}"]`);
                                 r.disabled = false; r.click(); }""", name)


def _set(page, values: dict):
    for name, value in values.items():
        control = page.locator(f"[name={name}]")
        if isinstance(value, bool):
            control.set_checked(value)
        elif control.evaluate("e => e.tagName") == "SELECT":
            control.select_option(str(value))
        else:
            control.fill(str(value))


def test_the_new_controls_reach_the_request_with_their_types(page, studio_app):
    _stop_posts(page)
    _open(page)
    catalog = httpx.get(f"{studio_app.url}/v1/task_types", headers=studio_app.headers, timeout=30).json()
    radios = page.locator("input[name=task_type]").evaluate_all("rs => rs.map(r => r.value)")
    assert radios == [task["task_type"] for task in catalog["tasks"]] == list(TASK_TYPES)
    formats = page.locator("[name=audio_format] option").all_text_contents()
    assert formats == catalog["audio_formats"] == list(AUDIO_FORMATS)
    page.get_by_label("Caption", exact=True).fill("a slow ballad")
    first = _sent(page)
    for name in ("sampler_mode", "dcw_enabled", "inference_steps", "audio_format", "enable_normalization"):
        assert name not in first, f"{name} is at its default: the server's to apply"
    _task(page, "repaint")
    for summary in ("Sampler", "DCW", "Output", "Repaint"):
        page.locator("summary", has_text=summary).click()
    chosen = {"sampler_mode": "heun", "velocity_norm_threshold": 0.5, "velocity_ema_factor": 0.1, "retake_seed": 7,
              "retake_variance": 0.2, "dcw_enabled": False, "dcw_mode": "low", "dcw_scaler": 0.03,
              "dcw_wavelet": "db4", "enable_normalization": False, "normalization_db": -3, "fade_in_duration": 1.5,
              "fade_out_duration": 2, "latent_shift": -0.04, "latent_rescale": 0.9, "audio_format": formats[-1],
              "repaint_mode": "aggressive", "repaint_strength": 0.7, "chunk_mask_mode": "explicit",
              "repaint_latent_crossfade_frames": 5, "repaint_wav_crossfade_sec": 0.1}
    _set(page, {**chosen, "dcw_enabled": "false"})
    sent = _sent(page)
    assert {name: sent.get(name) for name in chosen} == chosen
    assert type(sent["retake_seed"]) is int and type(sent["repaint_latent_crossfade_frames"]) is int
    assert sent["dcw_enabled"] is False and sent["enable_normalization"] is False
    for name in ("dcw_high_scaler", "cover_noise_strength", "global_caption"):
        assert name not in sent  # at its default, or a field of another task
    _set(page, {"retake_seed": "7, 8"})
    assert _sent(page)["retake_seed"] == "7, 8"  # one seed per item: the server reads the string
    for task in COVER_TASKS:
        _task(page, task)
        _set(page, {"cover_noise_strength": 0.25})
        sent = _sent(page)
        assert (sent["task_type"], sent["cover_noise_strength"]) == (task, 0.25)
        assert "repaint_mode" not in sent
    _task(page, "lego")
    _set(page, {"global_caption": "a full band rock song"})
    sent = _sent(page)
    assert (sent["task_type"], sent["global_caption"]) == ("lego", "a full band rock song")


def _with_xl(page):
    """The app as if it also served "xl-sft" with XL_PRESET: /v1/info and /v1/models as the server
    answers them, plus that entry (this session's app serves one DiT)."""

    def extend(route, path, entry):
        response = route.fetch()
        data = response.json()
        data[path].append(entry)
        route.fulfill(response=response, json=data)

    page.route("**/v1/info", lambda route: extend(route, "models", {"name": "xl-sft", "is_default": False,
                                                                     "is_turbo": False}))
    page.route("**/v1/models", lambda route: extend(route, "data", {"id": "acestep/xl-sft", "preset": XL_PRESET}))
    # what the app would serve with it: the tasks of its base-like variant
    page.route("**/v1/task_types?model=xl-sft",
               lambda route: route.fulfill(response=route.fetch(url=route.request.url.replace("xl-sft", "base"))))


def test_a_models_preset_is_the_default_of_the_fields_it_names(page, studio_app):
    listed = httpx.get(f"{studio_app.url}/v1/models", headers=studio_app.headers, timeout=30).json()["data"]
    own = listed[0].get("preset") or {}  # the served (default) DiT's preset, if the server gives one
    _stop_posts(page)
    _with_xl(page)
    _open(page)
    picker = page.get_by_label("DiT model")
    picker.wait_for(state="visible")  # an XL model is a choice like any other served DiT
    assert picker.locator("option").all_text_contents()[1:] == [m["id"].removeprefix("acestep/") for m in listed] + [
        "xl-sft"]
    picker.select_option("xl-sft")
    read = "() => ['inference_steps', 'shift', 'guidance_scale'].map(n => Number(document.querySelector(`[name=${n}]`).value))"
    expected = [XL_PRESET["inference_steps"], XL_PRESET["shift"], XL_PRESET["guidance_scale"]]
    try:  # the presets arrive with the model info, which may land just after the picker lists the model
        page.wait_for_function(f"(want) => ({read})().every((v, i) => v === want[i])", arg=expected, timeout=15_000)
    except PlaywrightTimeout:
        pass  # the assertion below says what the page shows instead
    assert page.evaluate(read) == expected
    assert page.locator("[name=sampler_mode] option").first.text_content() == "model default (heun)"
    assert page.locator("[name=dcw_enabled] option").first.text_content() == "model default (off)"
    assert "xl-sft" in page.locator("#preset").text_content() and page.locator("#preset").is_visible()
    page.get_by_text("Advanced settings").click()
    page.get_by_label("Steps").fill("4")  # the user's value outlives a change of model
    picker.select_option("")
    schema = GenerationParams()
    assert page.get_by_label("Steps").input_value() == "4"
    assert float(page.locator("[name=shift]").input_value()) == own.get("shift", schema.shift)
    assert float(page.locator("[name=guidance_scale]").input_value()) == own.get("guidance_scale", schema.guidance_scale)
    picker.select_option("xl-sft")
    sent = _sent(page)
    assert (sent["model"], sent["inference_steps"]) == ("xl-sft", 4)
    for name in ("shift", "guidance_scale", "sampler_mode", "dcw_enabled"):
        assert name not in sent, f"{name} is the model's preset: the server applies it"
