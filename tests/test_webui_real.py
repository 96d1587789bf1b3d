"""The chat page with the real default model (the session's `server`): the README question at
temperature 0 answers Paris, Stop frees the slot, and the test writes a screenshot of the
finished conversation (to `$LLAMA_JAX_ARTIFACTS`, default the pytest temporary folder)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
from test_webui import chromium_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True)
        pg = browser.new_page(viewport={"width": 1100, "height": 760})
        pg.set_default_timeout(120_000)
        pg.errors = []
        pg.on("console", lambda m: m.type == "error" and pg.errors.append(m.text))
        pg.on("pageerror", lambda e: pg.errors.append(str(e)))
        pg.goto(server.url + "/")
        pg.wait_for_function("() => document.querySelector('#model').options.length > 0")
        yield pg
        browser.close()


def live_slots(server) -> int:
    return sum(s["is_processing"] for s in httpx.get(server.url + "/slots").json())


def test_the_readme_question_streams_paris(page, server, tmp_path_factory):
    assert page.locator("#model").input_value() == "smollm2-135m-instruct"
    assert page.locator("#max-tokens").input_value() == ""  # by default the server picks what fits
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "change")
    page.fill("#input", "What is the capital of France?")
    page.press("#input", "Enter")
    # Done when the answer's stats (written at the end of the stream) show and Send is back.
    page.wait_for_function(
        "() => document.querySelector('.message.assistant .stats')?.textContent.includes('tok/s')"
    )
    page.locator("#send").wait_for(state="visible")
    answer = page.locator(".message.assistant .body").last.inner_text()
    assert "Paris" in answer, answer
    assert "tok/s" in page.locator(".message.assistant .stats").last.inner_text()
    out = Path(os.environ.get("LLAMA_JAX_ARTIFACTS") or tmp_path_factory.mktemp("artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / "webui-conversation.png"))
    print("screenshot:", out / "webui-conversation.png")
    assert not page.errors


def test_stop_ends_a_long_answer_and_frees_the_slot(page, server):
    page.fill("#max-tokens", "400")
    page.dispatch_event("#max-tokens", "change")
    page.fill("#temperature", "0.8")
    page.dispatch_event("#temperature", "change")
    page.fill("#input", "Write a very long story about a dragon.")
    page.press("#input", "Enter")
    page.wait_for_function(
        "() => document.querySelector('.message.streaming .body')?.textContent.length > 20"
    )
    assert live_slots(server) == 1
    page.click("#stop")
    page.locator("#send").wait_for(state="visible")
    assert "stopped" in page.locator(".message.assistant .stats").last.inner_text()
    deadline = time.monotonic() + 20
    while live_slots(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_slots(server) == 0
