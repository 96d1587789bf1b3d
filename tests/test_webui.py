"""The chat page at `/`, driven in a real headless Chromium (Playwright against the system
`chromium`, which `make install` puts there) talking to a real tiny-model server with an API
key. Every page records its requests: none may leave the server's origin."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import shutil
import time

import httpx
import pytest
from conftest import Server
from tiny import random_tensors, tiny_config, write_gguf

from serve.app import create_app
from serve.settings import Settings

KEY = "sk-webui-test"
CONTEXT = 512  # the tiny model's own limit: room for a generation long enough to stop halfway


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail(
        "the web UI tests need Chromium on PATH: `make install` installs it "
        "(apt-get install -y chromium), or install it yourself"
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = tiny_config()
    path = tmp_path_factory.mktemp("webui") / "tiny-chat.gguf"
    write_gguf(path, cfg, random_tensors(cfg))
    srv = Server(
        {
            "LLAMA_JAX_MODEL": str(path),
            "LLAMA_JAX_MAX_SEQ_LEN": str(CONTEXT),
            "LLAMA_JAX_MAX_SLOTS": "2",
            "LLAMA_JAX_WARMUP": "0",
            "LLAMA_JAX_API_KEYS": KEY,
            # float weights: the random model's replies keep the lengths these tests expect
            "LLAMA_JAX_QUANTIZE": "none",
        },
        path.parent / "server.log",
    )
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A fresh page (localStorage empty but for the API key); afterwards, no request may have
    gone anywhere but the server, and the console shows no error."""
    context = browser.new_context()
    context.add_init_script(
        f"localStorage.getItem('llama-jax.api-key') || localStorage.setItem('llama-jax.api-key', '{KEY}')"
    )
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    pg.requests = []
    pg.console_errors = []
    pg.on("request", lambda r: pg.requests.append(r))
    pg.on(
        "console",  # HTTP errors the test provokes are logged too: not what this looks for
        lambda m: (
            m.type == "error" and "Failed to load resource" not in m.text and pg.console_errors.append(m.text)
        ),
    )
    pg.on("pageerror", lambda e: pg.console_errors.append(str(e)))
    pg.goto(server.url + "/")
    pg.wait_for_function("() => document.querySelector('#model').options.length > 0")
    yield pg
    urls = [r.url for r in pg.requests]
    outside = [u for u in urls if not (u.startswith(server.url + "/") or u.startswith("data:"))]
    assert not outside, f"the page made requests outside {server.url}: {outside}"
    assert not pg.console_errors  # CSP violations and script errors land here
    context.close()


def set_max_tokens(page, n: int) -> None:
    page.fill("#max-tokens", str(n))
    page.dispatch_event("#max-tokens", "change")


def chat_requests(page) -> list:
    return [r for r in page.requests if r.url.endswith("/v1/chat/completions")]


def test_page_and_files_are_served_open_with_a_strict_csp(server):
    r = httpx.get(server.url + "/")  # no API key: the page itself stays open
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp and "http" not in csp
    for path, kind in [
        ("/static/webui/app.js", "text/javascript"),
        ("/static/webui/style.css", "text/css"),
        ("/static/webui/vendor/marked/marked.esm.js", "text/javascript"),
        ("/static/webui/vendor/marked/LICENSE", "text/plain"),
    ]:
        r = httpx.get(server.url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
    assert httpx.get(server.url + "/static/webui/nope.js").status_code == 404
    assert httpx.get(server.url + "/static/webui/%2e%2e/app.py").status_code == 404
    assert httpx.get(server.url + "/v1/models").status_code == 401  # the API is still keyed


def test_without_a_key_the_page_says_so_then_lists_the_model(browser, server):
    context = browser.new_context()
    pg = context.new_page()
    pg.goto(server.url + "/")
    error = pg.locator("#error")
    error.wait_for(state="visible")
    assert "Error 401" in error.inner_text() and "API key" in error.inner_text()
    pg.fill("#api-key", KEY)
    pg.dispatch_event("#api-key", "change")
    pg.wait_for_function("() => document.querySelector('#model').options.length > 0")
    assert pg.locator("#model option").all_inner_texts() == ["tiny-chat"]
    assert error.is_hidden()
    pg.reload()  # the key is kept in localStorage
    pg.wait_for_function("() => document.querySelector('#model').options.length > 0")
    assert pg.input_value("#api-key") == KEY
    context.close()


def test_a_message_sent_with_enter_streams_an_answer_kept_across_reloads(page, server):
    assert page.locator("#model option").all_inner_texts() == ["tiny-chat"]
    set_max_tokens(page, 12)
    page.fill("#system", "Be brief.")
    page.dispatch_event("#system", "change")
    box = page.locator("#input")
    box.click()
    box.press_sequentially("first line")
    box.press("Shift+Enter")  # a new line, not a send
    box.press_sequentially("second line")
    assert box.input_value() == "first line\nsecond line" and not chat_requests(page)
    with page.expect_response("**/v1/chat/completions") as response:
        box.press("Enter")
    assert response.value.headers["content-type"].startswith("text/event-stream")
    stats = page.locator(".message.assistant .stats")
    stats.wait_for(state="visible")
    page.wait_for_function(
        "() => /tok\\/s/.test(document.querySelector('.message.assistant .stats').textContent)"
    )
    assert re.search(r"\b12 tokens · [\d.]+ tok/s · prompt \d+", stats.inner_text()), stats.inner_text()
    assert (
        box.input_value() == "" and page.locator("#send").is_visible() and page.locator("#stop").is_hidden()
    )

    (req,) = chat_requests(page)
    body = req.post_data_json
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["reasoning_format"] == "none"  # thinking streams inline, not into a field it ignores
    assert body["max_tokens"] == 12 and body["temperature"] == 0.7 and body["top_p"] == 1
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first line\nsecond line"},
    ]
    answer = page.locator(".message.assistant .body").inner_text()
    assert page.locator(".message.user .body").inner_text() == "first line\nsecond line"

    page.reload()
    page.wait_for_function("() => document.querySelector('#model').options.length > 0")
    assert page.locator("#conversations .open").all_inner_texts() == ["first line second line"]
    assert page.locator(".message.assistant .body").inner_text() == answer
    assert "tok/s" in page.locator(".message.assistant .stats").inner_text()
    assert page.input_value("#system") == "Be brief." and page.input_value("#max-tokens") == "12"

    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    page.click("#conversations .delete")
    assert page.locator("#conversations li").count() == 0
    page.reload()
    page.wait_for_function("() => document.querySelector('#model').options.length > 0")
    assert page.locator("#conversations li").count() == 0
    assert page.evaluate("() => JSON.parse(localStorage.getItem('llama-jax.conversations'))") == []


def test_stop_aborts_the_request_and_the_server_cancels_the_generation(page, server):
    # The tiny model may sample its end token early; the UI has no ignore_eos, so add it on the wire.
    def add_ignore_eos(route):
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))

    page.route("**/v1/chat/completions", add_ignore_eos)
    set_max_tokens(page, CONTEXT - 112)
    page.fill("#input", "tell me a long story")
    with page.expect_response("**/v1/chat/completions") as response:
        page.press("#input", "Enter")
    request_id = response.value.headers["x-request-id"]
    page.locator("#stop").wait_for(state="visible")
    # Press Stop from inside the page the moment the first words show: the tiny model is fast
    # enough on some machines to finish before a click sent from here would land.
    page.evaluate(
        """() => new Promise((resolve) => {
            const body = document.querySelector('.message.streaming .body');
            const press = () => { document.querySelector('#stop').click(); resolve(); };
            if (body.textContent) return press();
            new MutationObserver((_, obs) => { if (body.textContent) { obs.disconnect(); press(); } })
                .observe(body, { childList: true, subtree: true, characterData: true });
        })"""
    )
    t0 = time.monotonic()
    page.locator("#send").wait_for(state="visible")
    assert page.locator("#stop").is_hidden() and page.locator(".message.streaming").count() == 0
    stats = page.locator(".message.assistant .stats").inner_text()
    assert "stopped" in stats, stats
    assert page.locator("#error").is_hidden()
    # The server saw the client go and ended the stream well short of max_tokens.
    line = ""
    while time.monotonic() - t0 < 30 and "disconnected" not in line:
        line = next((ln for ln in server.log().splitlines() if request_id in ln), "")
        time.sleep(0.1)
    assert "disconnected" in line, line
    completion = int(re.search(r"tokens=\d+\+(\d+)", line).group(1))
    assert completion < CONTEXT - 112, line
    # The page is usable again; the stopped answer is part of the conversation.
    page.unroute("**/v1/chat/completions")
    assert (
        page.evaluate("() => JSON.parse(localStorage.getItem('llama-jax.conversations'))[0].messages.length")
        == 2
    )


def test_server_errors_are_shown_and_the_message_is_given_back(page, server):
    set_max_tokens(page, 100_000)
    page.fill("#input", "hello")
    page.press("#input", "Enter")
    error = page.locator("#error")
    error.wait_for(state="visible")
    text = error.inner_text()
    assert text.startswith("Error 400:") and f"maximum context length is {CONTEXT} tokens" in text, text
    assert page.input_value("#input") == "hello"  # to fix max tokens and send again
    assert page.locator(".message").count() == 0 and page.locator("#send").is_visible()


def test_model_output_is_markdown_and_cannot_inject_html(page, server):
    answer = (
        "# Title\n\nSome **bold** text.\n\n```python\nprint('<b>hi</b>')\n```\n\n"
        "<script>window.pwned = 1</script><img src=x onerror='window.pwned = 2'>\n\n"
        "[click](javascript:window.pwned=3) ![pic](http://example.com/pic.png) <b onclick=x>raw</b>"
    )
    chunks = [answer[i : i + 7] for i in range(0, len(answer), 7)]
    events = [{"choices": [{"index": 0, "delta": {"content": c}}]} for c in chunks]
    events.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": len(chunks)}})
    sse = "".join(f"data: {json.dumps(e)}\r\n\r\n" for e in events) + "data: [DONE]\n\n"
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=sse),
    )
    page.fill("#input", "show me")
    page.press("#input", "Enter")
    page.locator(".message.assistant .stats").filter(has_text="tok/s").wait_for()
    body = page.locator(".message.assistant .body")
    assert body.locator("h1").inner_text() == "Title" and body.locator("strong").inner_text() == "bold"
    assert body.locator("pre code.language-python").inner_text().strip() == "print('<b>hi</b>')"
    assert body.locator("script, img, b, [onclick], [onerror]").count() == 0
    assert "<script>window.pwned = 1</script>" in body.inner_text()
    assert body.locator("a", has_text="click").get_attribute("href") is None
    assert body.locator("a", has_text="pic").get_attribute("href") == "http://example.com/pic.png"
    assert page.evaluate("() => window.pwned") is None
    assert f"{len(chunks)} tokens" in page.locator(".message.assistant .stats").inner_text()


def test_the_page_fits_a_phone_screen(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    context.add_init_script(f"localStorage.setItem('llama-jax.api-key', '{KEY}')")
    pg = context.new_page()
    pg.goto(server.url + "/")
    pg.wait_for_function("() => document.querySelector('#model').options.length > 0")
    assert pg.evaluate("() => document.documentElement.scrollWidth") <= 390
    for sel in ("#input", "#send", "#model", "#menu"):
        box = pg.locator(sel).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 844, (
            sel
        )
    assert pg.locator("#sidebar").bounding_box()["x"] < 0  # tucked away until the menu opens it
    pg.click("#menu")
    pg.wait_for_function("() => document.querySelector('#sidebar').getBoundingClientRect().x >= 0")
    assert pg.locator("#api-key").is_visible()
    context.close()


def run_async(coro):
    """`asyncio.run` on a thread of its own: Playwright's sync API keeps a loop on this one."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.mark.parametrize("settings", [Settings(webui=False), Settings.from_env({"LLAMA_JAX_WEBUI": "0"})])
def test_no_webui_leaves_the_root_a_json_404(settings):
    async def main():
        client = create_app(settings).test_client()
        root, script = await client.get("/"), await client.get("/static/webui/app.js")
        return root.status_code, script.status_code, await root.get_json()

    root, script, body = run_async(main())
    assert root == 404 and script == 404 and body["error"]["code"] == "not_found"


def test_webui_is_on_by_default():
    async def main():
        r = await create_app(Settings()).test_client().get("/")
        return r, await r.get_data()

    r, body = run_async(main())
    assert r.status_code == 200 and r.content_type.startswith("text/html") and b"/static/webui/app.js" in body
