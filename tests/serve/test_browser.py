"""The page in a real headless Chromium: pick an example, ask, read the answer (loopback only).

Uses Debian's ``chromium`` (``apt-get install -y chromium``; ``make test`` tries to install it) through
Playwright's Python client, with nothing downloaded: the test is skipped where either is missing.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'mmfuse[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'mmfuse[serve]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python client is not installed")

from mmfuse.serve import ServeConfig, VQAAdapter, create_app  # noqa: E402 - after the skips above
from tests.serve.helpers import ANSWERS, tiny_model  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install -y chromium)")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with socket.socket() as s:  # a free port on the loopback interface
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(VQAAdapter(tiny_model()), ServeConfig(max_wait_ms=1))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def test_page_answers_a_question(server: str) -> None:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone's width
            page.goto(server + "/")
            page.click("#submit")  # no image yet: the page says so instead of sending
            assert "Choose an image" in page.text_content("#error")
            page.wait_for_selector(".examples button")
            page.click(".examples button >> nth=0")
            page.fill("#question", "what color is the shape?")
            page.click("#submit")
            page.wait_for_selector("#result:not([hidden])", timeout=30_000)
            answer = page.text_content("#answer")
            assert answer in ANSWERS
            assert page.locator("#bars li").count() == 5
            assert page.text_content("#bars li .name") == answer  # the first bar is the answer
            page.wait_for_selector("#attention-map[src^='data:image/png']", timeout=30_000)
        finally:
            browser.close()
