"""The chat page in a real headless browser (Chromium from the Debian packages, driven by
Playwright): load the page, send a message, see the answer stream in, stop a generation, and
keep the history across turns. ``.ci/run`` installs chromium; without it this test skips."""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra (pip install -e '.[serve]')")
pytest.importorskip("httpx", reason="the server tests need the 'test' extra (httpx)")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs the 'test' extra (playwright)")

from serve_helpers import Server, new_engine, time_limit  # noqa: E402

from nanochat.serve.app import create_app  # noqa: E402

pytestmark = pytest.mark.engine
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def page():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does this)")
    # 40 ms per scheduler step: a generation of 100 tokens takes seconds, long enough to watch it
    # stream and to stop it (the model's context is 256 tokens, the whole chat must fit)
    srv = Server(create_app(new_engine(), model_id="tiny-random", step_delay=0.04))
    pw = sync_api.sync_playwright().start()
    browser = None
    try:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], timeout=TIMEOUT_MS)
        pg = browser.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(srv.url + "/")
        yield srv, pg
    finally:
        if browser is not None:
            browser.close()
        pw.stop()
        srv.close()


def assistant_texts(pg):
    return pg.locator('.msg.assistant').evaluate_all("els => els.map(e => e.firstChild ? e.firstChild.data || '' : '')")


def test_page_streams_an_answer_then_stops_a_long_one_and_keeps_history(page):
    srv, pg = page
    with time_limit(240):
        pg.wait_for_function("document.getElementById('status').textContent.startsWith('model: tiny-random')")
        requests = []
        pg.on("request", lambda r: requests.append(r) if r.url.endswith("/v1/chat/completions") else None)

        # 1. a short answer streams in and finishes; the page itself records every text it shows
        pg.evaluate("""() => {
            window.__shown = [];
            new MutationObserver(() => {
                const m = document.querySelector('.msg.assistant');
                if (m && m.firstChild && m.firstChild.data) window.__shown.push(m.firstChild.data);
            }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
        }""")
        pg.fill('[data-testid="max-tokens"]', "30")
        pg.fill('[data-testid="temperature"]', "0")
        pg.fill('[data-testid="input"]', "Hello there")
        pg.click('[data-testid="send"]')
        assert pg.locator('.msg.user').first.text_content() == "Hello there"
        pg.wait_for_selector('.msg.assistant[data-done]')
        assert pg.locator('.msg.assistant').first.get_attribute("data-done") in ("stop", "length")
        seen = set(pg.evaluate("window.__shown"))
        final = assistant_texts(pg)[0]
        assert final and len(seen) >= 2, seen  # several partial texts were shown before the end
        assert all(final.startswith(s) for s in seen)
        sent = json.loads(requests[0].post_data)
        assert sent["stream"] is True and sent["temperature"] == 0 and sent["max_tokens"] == 30
        assert sent["messages"] == [{"role": "user", "content": "Hello there"}]

        # 2. a long answer is stopped: the button aborts the stream, the server cancels the sequence
        pg.fill('[data-testid="max-tokens"]', "100")
        pg.fill('[data-testid="input"]', "Tell me more")
        pg.click('[data-testid="send"]')
        pg.wait_for_function("(() => { const m = document.querySelectorAll('.msg.assistant');"
                             " return m.length == 2 && m[1].firstChild && m[1].firstChild.data.length > 0; })()")
        assert pg.locator('[data-testid="stop"]').is_enabled()
        pg.click('[data-testid="stop"]')
        pg.wait_for_selector('.msg.assistant[data-done="stopped"]')
        assert pg.locator('[data-testid="send"]').is_enabled() and not pg.locator('[data-testid="stop"]').is_enabled()
        deadline = time.monotonic() + 10
        while srv.state.scheduler.active_count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.state.scheduler.active_count == 0
        stopped_text = assistant_texts(pg)[1]

        # 3. the next turn sends the whole history, the stopped partial answer included
        pg.fill('[data-testid="max-tokens"]', "5")
        pg.fill('[data-testid="input"]', "Thanks")
        pg.click('[data-testid="send"]')
        pg.wait_for_function("document.querySelectorAll('.msg.assistant[data-done]').length == 3")
        sent = json.loads(requests[-1].post_data)
        assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user", "assistant", "user"]
        assert sent["messages"][1]["content"] == final and sent["messages"][3]["content"] == stopped_text
        if os.environ.get("NANOCHAT_SCREENSHOT"):
            pg.screenshot(path=os.environ["NANOCHAT_SCREENSHOT"])
