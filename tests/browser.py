"""A real headless Chromium (the Debian package), driven over the DevTools
protocol with the WebSocket client the project already depends on: one
browser session per test, so a test sees what a page's own script does
over time (its refreshes), not only its first rendering."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

CHROMIUM = shutil.which("chromium")
# CI (.ci/run) installs Chromium, so there this never skips.
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: `apt-get install -y chromium` to run the status page's browser tests")

# Without the background-networking flags Chromium dials out at start (updates,
# sync, field trials), which a closed network refuses and some sandboxes kill.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-port=0"]


class Page:
    """One tab: navigate, evaluate JavaScript, take a screenshot."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params) -> dict:
        request_id = next(self.ids)
        await self.ws.send_message(json.dumps({"id": request_id, "method": method, "params": params}))
        with trio.fail_after(15):
            while True:  # skip the events the page sends between answers
                message = json.loads(await self.ws.get_message())
                if message.get("id") == request_id:
                    if "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    return message["result"]

    async def navigate(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self) -> bytes:
        return base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"])


def _page_socket(port: int) -> str:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
        [page] = [t for t in json.loads(response.read()) if t["type"] == "page"]
    return page["webSocketDebuggerUrl"]


@asynccontextmanager
async def chromium_page(width: int = 1000, height: int = 700):
    with tempfile.TemporaryDirectory(prefix="exocom-chromium-") as profile:
        # Port 0: Chromium picks a free port and writes it into the profile.
        active_port = Path(profile) / "DevToolsActivePort"
        process = await trio.lowlevel.open_process(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with trio.fail_after(30):
                while not (active_port.exists() and active_port.read_text().count("\n") >= 1):
                    assert process.poll() is None, f"chromium exited with {process.returncode}"
                    await trio.sleep(0.05)
            url = await trio.to_thread.run_sync(_page_socket, int(active_port.read_text().split()[0]))
            async with open_websocket_url(url, max_message_size=64 * 1024 * 1024) as ws:
                page = Page(ws)
                # The viewport itself, not the window around it, is width x height.
                await page.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                                deviceScaleFactor=1, mobile=False)
                yield page
        finally:
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
            if process.poll() is None:
                process.kill()
                await process.wait()
