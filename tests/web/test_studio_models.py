"""The studio's model choice in a real Chromium: the served DiT / LM lists (hidden while there is
nothing to choose), the adapter directory's adapters, and a generation with a chosen adapter and
scale that the server renders with them."""

from __future__ import annotations

import httpx
import pytest

from tests.web.conftest import DONE, RECORD_POSTS

pytestmark = pytest.mark.web



def _open(page):
    page.add_init_script(RECORD_POSTS)
    page.goto("/")
    page.wait_for_function("document.querySelectorAll('select[name=lora] option').length > 1")


def test_the_served_dits_are_a_choice_one_lm_is_not_and_the_adapters_are(page):
    _open(page)
    assert page.locator("#models").is_visible()
    assert page.get_by_label("LM model").is_hidden()
    assert page.get_by_label("DiT model").locator("option").all_text_contents() == [
        "default (acestep-v15-turbo)", "acestep-v15-turbo", "acestep-v15-base"]
    adapter = page.get_by_label("Adapter (LoRA)")
    assert adapter.locator("option").all_text_contents() == ["none (default)", "warm"]
    scale = page.get_by_label("Adapter scale")
    assert scale.is_disabled(), "a scale alone would rescale the server's default adapter"
    assert (scale.get_attribute("min"), scale.get_attribute("max")) == ("0", "2")  # the schema's range
    adapter.select_option("warm")
    assert scale.is_enabled() and scale.input_value() == "1"


def test_a_generation_with_a_chosen_adapter_and_scale(page, studio_app):
    _open(page)
    page.get_by_label("Caption", exact=True).fill("warm pads over a slow beat")
    page.get_by_label("Duration (s)").fill("10")
    page.get_by_text("Advanced settings").click()
    page.get_by_label("Steps").fill("2")
    page.get_by_label("Adapter (LoRA)").select_option("warm")
    page.get_by_label("Adapter scale").fill("0.5")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function(DONE, timeout=300_000)
    (sent,) = page.evaluate("() => window.__posts")
    assert (sent["lora"], sent["lora_scale"]) == ("warm", 0.5)
    assert "model" not in sent and "lm_model" not in sent  # the defaults are the server's to pick
    task_id = page.locator(".card").first.get_attribute("data-task")
    status = httpx.get(f"{studio_app.url}/v1/tasks/{task_id}", headers=studio_app.headers, timeout=30).json()
    assert status["result"]["metadata"]["models"]["adapters"] == [["warm", 0.5]]
    card = page.locator(".card").first
    card.locator("figure p").first.wait_for()
    assert "warm@0.5" in card.locator("figure p").first.text_content()
