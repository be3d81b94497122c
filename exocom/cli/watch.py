"""`exocom status --watch`: follow a rollout live.

On a terminal the status (roles with each version's state and share,
deployments) and, for each ramping version, its next step and gate figures
against their limits are redrawn in place every interval. Anywhere else (a
pipe, a file, a CI log) it prints one plain timestamped line per change,
without escape codes, so that the output reads as a history. Ctrl-C ends
it with exit 0; a broker that stops answering is reported and watched on.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any, TextIO

from .rollout import describe, gates
from .status import (UNREACHABLE, Unreachable, broker_url, collect, deployment_progress, ramp_step, render,
                     unreachable_advice)

# ANSI: the cursor home, clear to the end of the line, clear below the cursor, clear the screen.
HOME, CLEAR_LINE, CLEAR_BELOW, CLEAR_SCREEN = "\x1b[H", "\x1b[K", "\x1b[J", "\x1b[2J"


def watch_command(url: str | None, interval: float, environ, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    url = broker_url("exocom status --watch", url, environ)
    if url is None:
        return UNREACHABLE
    if interval <= 0:
        print("exocom status --watch: --interval must be above 0 seconds", file=sys.stderr)
        return UNREACHABLE
    show = Screen(out, url, interval) if out.isatty() else Lines(out, url)
    try:
        while True:
            try:
                status, error = collect(url), None
            except Unreachable as e:
                status, error = None, e
            show(status, error, time.time())
            time.sleep(interval)
    except KeyboardInterrupt:
        out.flush()
        return 0


class Screen:
    """Redraws the whole view in place: home, each line cleared to its end,
    then whatever the previous, longer view left below is cleared."""

    def __init__(self, out: TextIO, url: str, interval: float) -> None:
        self.out, self.url, self.interval = out, url, interval
        self.out.write(CLEAR_SCREEN)

    def __call__(self, status: dict[str, Any] | None, error: Unreachable | None, now: float) -> None:
        header = (f"exocom status --watch {self.url}: every {self.interval:g}s, "
                  f"{time.strftime('%H:%M:%S', time.localtime(now))} (Ctrl-C to stop)")
        if status is None:
            body = [unreachable_advice(error), f"Trying again every {self.interval:g}s."]
        else:
            body = render(status).splitlines()
            for d in status["deployments"]:
                if d.get("rollout") and d["state"] == "ramping":
                    body += ["", *describe(d, now)]
        lines = fit([header, "", *body], shutil.get_terminal_size())
        self.out.write(HOME + "".join(f"{line}{CLEAR_LINE}\n" for line in lines) + CLEAR_BELOW)
        self.out.flush()


def fit(lines: list[str], size: os.terminal_size) -> list[str]:
    """As many lines as the terminal shows without scrolling (long lines wrap,
    and the cursor ends on the row below the last): a view that scrolled
    would be redrawn below its top, not in place."""
    def rows(line: str) -> int:
        return max(1, -(-len(line) // max(size.columns, 1)))

    budget = size.lines - 1
    if sum(map(rows, lines)) <= budget:
        return lines
    kept, used = [], 0
    for i, line in enumerate(lines):
        more = f"... {len(lines) - i} more lines: enlarge the terminal, or run `exocom status`"
        if used + rows(line) + rows(more) > budget:
            return kept + [more]
        kept.append(line)
        used += rows(line)
    return kept


class Lines:
    """Prints what changed since the last look, one timestamped line each."""

    def __init__(self, out: TextIO, url: str) -> None:
        self.out, self.url = out, url
        self.seen: dict[tuple[str, ...], str] = {}

    def __call__(self, status: dict[str, Any] | None, error: Unreachable | None, now: float) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
        current = facts(self.url, status, error)
        if status is None:  # while unreachable, what was seen last still stands
            current = {**self.seen, **current}
        gone = {key: f"{key[1]} {key[2]}: not connected" if key[0] == "version" else f"{key[1]}@{key[2]}: gone"
                for key in self.seen.keys() - current.keys()}
        for text in [text for key, text in current.items() if self.seen.get(key) != text] + list(gone.values()):
            self.out.write(f"{stamp} {text}\n")
        self.out.flush()
        self.seen = current


def facts(url: str, status: dict[str, Any] | None, error: Unreachable | None) -> dict[tuple[str, ...], str]:
    """What the plain lines report, keyed by what they are about; figures
    that move with every reply or second are left out (verdicts are not)."""
    if status is None:
        return {("broker",): str(error)}
    out: dict[tuple[str, ...], str] = {("broker",): f"broker at {url} answers"}
    for client in status["clients"]:
        for v in client.get("versions", []):
            n = v["instances"]
            out[("version", client["role"], v["version"])] = (
                f"{client['role']} {v['version']}: {v['state']}, share {v.get('share', 0):g}%, "
                f"{n} instance{'s' * (n != 1)}")
    for d in status["deployments"]:
        text = f"{d['role']}@{d['version']}: deployment {d['state']}, {deployment_progress(d, status)}"
        if d.get("rollout") and d["state"] == "ramping":
            text += f", ramp {ramp_step(d)}" + (", paused" if d["rollout"]["paused"] else "")
            text += "".join(f", {g['gate']} {g['verdict']}" for g in gates(d))
        elif d["state"] == "failed" and d.get("stopped"):
            text += f", {d['stopped']}"
        out[("deployment", d["role"], d["version"])] = text
    return out
