"""A real Chromium (Debian's ``chromium`` package) driven by Playwright against the real app on
demo checkpoints. Without a chromium binary the web tests skip with a message, except under CI
(``CI`` set), where they must run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.serve.conftest import deployed_app

# The newest song card has finished.
DONE = "document.querySelector('.card') && document.querySelector('.card').dataset.phase === 'done'"

# The JSON bodies the page posts to /v1/tasks, read in the page before they leave.
RECORD_POSTS = """
const original = window.fetch;
window.__posts = [];
window.fetch = (url, options = {}) => {
  if (String(url).endsWith('/v1/tasks') && typeof options.body === 'string') window.__posts.push(JSON.parse(options.body));
  return original(url, options);
};
"""

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def chromium_path():
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")  # tests/web runs last: one browser and one app for all its modules
def browser():
    executable = chromium_path()
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but no chromium binary was found: apt-get install chromium")
        pytest.skip("no chromium binary (apt-get install chromium); the web tests need a real browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True,
                                              args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def studio_app(demo_root, tmp_path_factory):
    """The demo app as `acestep serve --demo` serves it (turbo, and base for lego/extract/complete),
    with an adapter directory (one demo LoRA, "warm") for the model choice."""
    from acestep.checkpoints.demo_lora import write_demo_lora

    adapters = tmp_path_factory.mktemp("studio-adapters")
    write_demo_lora(adapters / "warm", seed=1)
    yield from deployed_app(demo_root, tmp_path_factory.mktemp("studio-state"),
                            dit={"adapters": {"dir": str(adapters)}, "extra_models": ["acestep-v15-base"]})


@pytest.fixture
def page(browser, studio_app):
    """A fresh browser context (its own localStorage) with the app's key stored, as a user who
    typed it once."""
    context = browser.new_context(base_url=studio_app.url, accept_downloads=True,
                                  viewport={"width": 1280, "height": 900})
    key = studio_app.keys["default"]
    context.add_init_script(f"if (!localStorage.getItem('acestep.apiKey')) localStorage.setItem('acestep.apiKey', {key!r});")
    page = context.new_page()
    yield page
    # a test's route handler may still be fetching (the page asked again as it ended): let it go
    # quietly rather than raise into whichever test runs next
    page.unroute_all(behavior="ignoreErrors")
    context.close()
