"""The status page at `/`, rendered by a real headless Chromium against a real
broker whose `todos` 2.0.0 is ramping beside 1.0.0 (contract 7)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import trio

from browser import chromium_page, needs_chromium
from fleet import NEW, OLD, ScriptLog, ask, deployment_script, http, routes, todos, wait_deployment, wait_until, web
from processes import ROOT
from wire import running_broker

pytestmark = [pytest.mark.browser, needs_chromium]

# A reply-time limit no loaded test machine reaches (reply times on loopback
# vary a lot): the ramp must not abort by itself while the test looks.
GATES = {"minSamples": 5, "errorMessages": ["todos.failed"], "maxErrorRate": 0.2, "maxReplyTimeRatio": 1000,
         "maxDisconnects": 1}
# A long interval: the ramp stays at its first step while the test looks.
ROLLOUT = {"steps": [10, 50, 100], "interval": 600, "gates": GATES}

# What the page shows, read from the DOM as a person would read it.
SHOWN = """(() => {
  const text = node => node ? node.innerText.replace(/\\s+/g, " ").trim() : null;
  const rows = {};
  for (const row of document.querySelectorAll("tr[data-version]")) rows[row.dataset.version] = text(row);
  const gates = {};
  for (const row of document.querySelectorAll("tr[data-gate]")) gates[row.dataset.gate] = text(row);
  const d = document.querySelector(`[data-deployment="todos@${NEW}"]`);
  return {rows, gates, deployment: text(d), updated: text(document.getElementById("updated"))};
})()""".replace("${NEW}", NEW)


async def shown_when(page, condition, what: str, timeout: float = 10.0) -> dict:
    """Poll the rendered page until `condition(shown)` holds; the page refreshes on its own."""
    last = {}

    async def check():
        nonlocal last
        last = await page.evaluate(SHOWN)
        return last if condition(last) else None
    try:
        return await wait_until(check, what, timeout, interval=0.1)
    except AssertionError as e:
        raise AssertionError(f"{e}; the page shows {json.dumps(last, indent=1)}") from None


async def test_the_status_page_shows_a_ramp_and_follows_a_pause_and_an_abort_without_reloading(tmp_path):
    log = ScriptLog()
    async with running_broker(routes(rollout=ROLLOUT), tmp_path=tmp_path) as broker, \
            todos(broker.url, OLD, []), todos(broker.url, NEW, []), web(broker.url) as client, \
            deployment_script(broker.url, log, online=lambda relay: trio.sleep_forever()):
        await wait_deployment(broker.port, lambda d: d["state"] == "ramping", "2.0.0 to ramp")
        # Replies of each version (a version requirement only one satisfies
        # reaches it), enough for every gate to judge.
        for i in range(8):
            assert await ask(client, f"new-{i}", version=NEW) == NEW
            assert await ask(client, f"old-{i}", version=OLD) == OLD

        async with chromium_page() as page:
            await page.navigate(f"http://127.0.0.1:{broker.port}/")
            ramping = await shown_when(page, lambda s: f"todos@{NEW}" in s["rows"] and s["gates"],
                                       "the page to show the ramp")
            # A role's name heads its first version's row only.
            assert ramping["rows"][f"todos@{NEW}"].endswith(f"{NEW} ramping 10 % 1")
            assert ramping["rows"][f"todos@{OLD}"].endswith(f"{OLD} live 90 % 1")
            assert ramping["rows"]["web@0.0.0"] == "web 0.0.0 live 100 % 1"
            assert "step 1 of 3: 10 %" in ramping["deployment"]
            assert re.search(r"next step in (9 min \d+ s|10 min)\b", ramping["deployment"]), ramping["deployment"]
            assert "deployed by todos-deployment" in ramping["deployment"]
            replies = ramping["gates"]["replies"].split()
            assert replies[0] == "replies" and int(replies[1]) >= 8 and replies[2:] == ["≥", "5", "enough", "samples"]
            assert ramping["gates"]["errorRate"] == "errorRate 0 % 20 % ok"
            assert ramping["gates"]["disconnects"] == "disconnects 0 1 ok"
            assert re.fullmatch(r"replyTimeRatio [\d.]+ 1000 ok", ramping["gates"]["replyTimeRatio"])
            if os.environ.get("EXOCOM_STATUS_SCREENSHOT"):  # how docs/status-page.png is made
                Path(ROOT, os.environ["EXOCOM_STATUS_SCREENSHOT"]).write_bytes(await page.screenshot())

            # The same document, never reloaded: a mark set now must survive.
            await page.evaluate("window.sameDocument = true")
            assert (await http(broker.port, "POST", f"/deployments/todos@{NEW}/rollout/pause"))[0] == 202
            paused = await shown_when(page, lambda s: "paused" in s["deployment"], "the page to show the pause")
            assert "next step in" not in paused["deployment"]
            assert (await http(broker.port, "POST", f"/deployments/todos@{NEW}/rollout/abort"))[0] == 202
            aborted = await shown_when(page, lambda s: "failed" in s["rows"].get(f"todos@{NEW}", ""),
                                       "the page to show the abort")
            assert await page.evaluate("window.sameDocument") is True
            assert aborted["rows"][f"todos@{NEW}"].endswith(f"{NEW} failed 0 % 1")
            assert aborted["rows"][f"todos@{OLD}"].endswith(f"{OLD} live 100 % 1")
            assert "stopped: " in aborted["deployment"] and "step 1 of 3" not in aborted["deployment"]
            assert aborted["gates"] == {}


async def test_server_supplied_text_is_shown_not_run_and_a_lost_broker_is_said_plainly(tmp_path):
    markup = '<img id="injected" src="x" onerror="window.injected = true">'

    async def offline(relay):
        raise RuntimeError(markup)

    async with chromium_page() as page:
        async with running_broker(routes(), tmp_path=tmp_path) as broker, todos(broker.url, OLD, []), \
                todos(broker.url, NEW, []), deployment_script(broker.url, ScriptLog(), offline=offline):
            await wait_deployment(broker.port, lambda d: any(s["lastError"] for s in d["steps"]),
                                  "the offline step to fail")
            await page.navigate(f"http://127.0.0.1:{broker.port}/")
            shown = await shown_when(page, lambda s: markup in (s["deployment"] or ""), "the error as text")
            injected = await page.evaluate("[document.getElementById('injected'), window.injected ?? null]")
            assert injected == [None, None]
            assert "failed" in shown["rows"][f"todos@{NEW}"]
        # The broker is gone: the page keeps its last view and says it is old.
        gone = await shown_when(page, lambda s: s["updated"].startswith("cannot reach the broker"), "the page to notice")
        assert markup in gone["deployment"]
