"""Messages lost to a stuck instance (issue 8, item 11), with real processes.

One role `sink` with two instances of one version and a sender `flooder`
that sends a steady stream of `bulk` messages to it. Once both sinks are
registered, one of them is stopped with SIGSTOP (as a process stuck in a
debugger, a GC pause or a full disk would be) and the flood runs. Then:

  resumes  the stopped sink gets SIGCONT and reads what was kept for it;
           lost = N - |union of what both received|
  dies     the stopped sink gets SIGKILL;
           lost = N - |what the live sink received|

The broker under test is started from any checkout (`--checkout`), with that
checkout first on sys.path and the venv's editable finder removed, so the
same driver measures the code before and after a change. Each sink is a
subprocess of this file (`--sink`) on a blocking raw socket: a stopped sink
must stop reading its socket exactly as a stuck service would, and a client
without a background reader task does that by construction.

    .venv/bin/python bench/stuck_instance.py [--checkout DIR] [--variant resumes|dies]
                                             [--rate R] [--seconds S] [--reps K]

Prints one JSON line per run, then a summary per variant.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import orjson

HERE = Path(__file__).resolve()
DEFAULT_CHECKOUT = HERE.parent.parent
ROUTES = {"flooder": {"sends": ["bulk"]}, "sink": {"receives": ["bulk"]}}
PAD = "x" * 200
EVENTS = ("slow consumer disconnected", "instance congested", "instance drained",
          "queued frames re-routed", "queued frames lost")
QUIET_S = 2.0  # a sink whose record has not grown for this long has read everything it will get

# Run as `python -c`: the checkout must win over the editable install of
# /work/main (its .pth puts /work/main on sys.path), and the banner on stderr
# lets the driver check which code actually runs.
LAUNCHER = (
    "import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
    "sys.path.insert(0, sys.argv[1]); import exocom; "
    "sys.stderr.write('exocom from %s\\n' % exocom.__file__); sys.stderr.flush(); "
    "from exocom.cli import main; sys.exit(main(sys.argv[2:]))"
)


# ----------------------------------------------------------------- WebSocket

def client_frame(data: bytes) -> bytes:
    # Clients must mask; an all-zero key is valid and spares a Python XOR per
    # byte, which would otherwise cap the flood rate on a 2-core machine.
    n = len(data)
    if n < 126:
        header = bytes((0x81, 0x80 | n))
    elif n < 65536:
        header = bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + b"\0\0\0\0" + data


def connect(port: int) -> tuple[socket.socket, bytearray]:
    """A WebSocket to the broker's /services: (socket, bytes already read past the handshake)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /services HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the broker closed during the handshake")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        raise ConnectionError(f"handshake refused: {head[:200]!r}")
    return sock, bytearray(rest)


def register(sock: socket.socket, role: str) -> None:
    sock.sendall(client_frame(orjson.dumps({"name": "exocom.register-service", "sender": role,
                                            "id": str(uuid.uuid4())})))


def parse_frames(buf: bytearray):
    """Complete frames at the start of `buf` as (opcode, payload); consumes them."""
    pos, end, out = 0, len(buf), []
    while end - pos >= 2:
        b0, b1 = buf[pos], buf[pos + 1]
        length, p = b1 & 0x7F, pos + 2
        if length == 126:
            if end - p < 2:
                break
            length, p = int.from_bytes(buf[p:p + 2], "big"), p + 2
        elif length == 127:
            if end - p < 8:
                break
            length, p = int.from_bytes(buf[p:p + 8], "big"), p + 8
        mask = None
        if b1 & 0x80:  # servers do not mask, but nothing forbids reading it
            if end - p < 4:
                break
            mask, p = bytes(buf[p:p + 4]), p + 4
        if end - p < length:
            break
        payload = bytes(buf[p:p + length])
        if mask:
            payload = bytes(c ^ mask[i & 3] for i, c in enumerate(payload))
        out.append((b0 & 0x0F, payload))
        pos = p + length
    del buf[:pos]
    return out


# ---------------------------------------------------------------------- sink

def run_sink(port: int, record: str) -> int:
    """Register as `sink` and append the `n` of every bulk message to `record`,
    written after every read so that SIGSTOP or SIGKILL loses nothing it got."""
    sock, buf = connect(port)
    register(sock, "sink")
    fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    partial = b""
    try:
        while True:
            frames = parse_frames(buf)
            got = []
            for opcode, payload in frames:
                if opcode in (0x1, 0x0):  # text, or a continuation of a fragmented one
                    partial += payload
                    try:
                        message = orjson.loads(partial)
                    except orjson.JSONDecodeError:
                        continue  # the rest of a fragmented message is still to come
                    partial = b""
                    if message.get("name") == "bulk":
                        got.append(message["payload"]["n"])
                elif opcode == 0x9:  # ping
                    sock.sendall(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
                elif opcode == 0x8:  # close
                    return 0
            if got:
                os.write(fd, ("\n".join(map(str, got)) + "\n").encode())
            try:
                chunk = sock.recv(1 << 18)
            except OSError:
                return 0
            if not chunk:
                return 0
            buf += chunk
    finally:
        os.close(fd)


def read_record(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(line) for line in path.read_text().split("\n") if line]


# -------------------------------------------------------------------- broker

class Broker:
    def __init__(self, checkout: Path, work: Path):
        self.log_path = work / "broker.log"
        self.err_path = work / "broker.err"
        (work / "routes.json").write_text(json.dumps(ROUTES))
        (work / "state").mkdir()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(checkout), "serve", "--host", "127.0.0.1", "--port", "0",
             "--config", str(work / "routes.json"), "--state-dir", str(work / "state"), "--log-format", "json"],
            stdout=open(self.log_path, "wb"), stderr=open(self.err_path, "wb"),
            cwd=work)  # not the repository: `python -c` puts the cwd first on sys.path
        listening = self.wait_for(lambda e: e.get("event") == "broker listening", 20)
        self.port = int(listening["port"])
        banner = self.err_path.read_text().splitlines()[0]
        self.exocom_file = banner.removeprefix("exocom from ")
        if not Path(self.exocom_file).resolve().is_relative_to(checkout.resolve()):
            raise RuntimeError(f"wrong code under test: {banner} (wanted {checkout})")

    def events(self) -> list[dict]:
        events = []
        for line in self.log_path.read_bytes().splitlines():
            try:
                events.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                pass  # a line being written
        return events

    def wait_for(self, predicate, timeout: float, count: int = 1) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [e for e in self.events() if predicate(e)]
            if len(hits) >= count:
                return hits[-1]
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited: {self.err_path.read_text()[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"broker log: no event after {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------- flooder

def flood(port: int, n: int, rate: float) -> dict:
    """Send n bulk messages at `rate` per second; sendall blocks if the broker
    falls behind, so the achieved rate is measured, not assumed."""
    frames = [client_frame(orjson.dumps({"name": "bulk", "sender": "flooder", "id": str(uuid.uuid4()),
                                         "activityId": str(uuid.uuid4()), "payload": {"n": i, "pad": PAD}}))
              for i in range(n)]
    sock, _ = connect(port)
    register(sock, "flooder")
    replies: dict[str, int] = {}
    time.sleep(0.2)  # the registration is handled before the first message
    start = time.monotonic()
    sent = 0
    while sent < n:
        due = min(n, int((time.monotonic() - start) * rate) + 1)
        if due > sent:
            sock.sendall(b"".join(frames[sent:due]))
            sent = due
        # Whatever the broker says to the flooder (refusals) is read and
        # counted, so that its socket never backs up.
        try:
            data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
            for opcode, payload in parse_frames(bytearray(data)):
                if opcode == 0x1:
                    name = orjson.loads(payload).get("name", "?")
                    replies[name] = replies.get(name, 0) + 1
        except (BlockingIOError, orjson.JSONDecodeError):
            pass
        time.sleep(0.002)
    elapsed = time.monotonic() - start
    return {"sock": sock, "elapsed_s": round(elapsed, 2), "achieved_rate": round(n / elapsed), "replies": replies}


def wait_quiet(paths: list[Path], timeout: float) -> bool:
    """Until none of the records has grown for QUIET_S seconds."""
    deadline = time.monotonic() + timeout
    sizes, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now_sizes = [p.stat().st_size if p.exists() else 0 for p in paths]
        if now_sizes != sizes:
            sizes, since = now_sizes, time.monotonic()
        elif time.monotonic() - since >= QUIET_S:
            return True
        time.sleep(0.1)
    return False


# ----------------------------------------------------------------------- run

def run_once(checkout: Path, variant: str, rate: float, seconds: float) -> dict:
    n = int(rate * seconds)
    with tempfile.TemporaryDirectory(prefix="stuck-instance-") as tmp:
        work = Path(tmp)
        broker = Broker(checkout, work)
        sinks: list[subprocess.Popen] = []
        records = [work / "live.txt", work / "stopped.txt"]
        flooder = None
        try:
            for i, record in enumerate(records):
                sinks.append(subprocess.Popen([sys.executable, str(HERE), "--sink", str(broker.port), str(record)]))
                # One at a time, so that which sink is stopped does not depend on who registered first.
                broker.wait_for(lambda e: e.get("event") == "service registered" and e.get("role") == "sink",
                                10, count=i + 1)
            live, stopped = sinks
            stopped.send_signal(signal.SIGSTOP)
            t0, flood_started = time.monotonic(), time.time()
            flooder = flood(broker.port, n, rate)
            if variant == "resumes":
                stopped.send_signal(signal.SIGCONT)
            else:
                stopped.send_signal(signal.SIGKILL)
                stopped.wait()
            quiet = wait_quiet(records, 30)
            settle_s = round(time.monotonic() - t0 - flooder["elapsed_s"], 2)
        finally:
            for p in sinks:
                if p.poll() is None:
                    p.send_signal(signal.SIGCONT)  # a stopped process does not act on SIGTERM
                    p.terminate()
                p.wait()
            if flooder is not None:
                flooder["sock"].close()
            broker.stop()
        got_live, got_stopped = read_record(records[0]), read_record(records[1])
        events = broker.events()

    received = set(got_live) | set(got_stopped) if variant == "resumes" else set(got_live)
    seen = [e for e in events if e.get("event") in EVENTS]
    return {
        "checkout": str(checkout), "exocom": broker.exocom_file, "variant": variant,
        "sent": n, "target_rate": rate, "achieved_rate": flooder["achieved_rate"], "flood_s": flooder["elapsed_s"],
        "lost": n - len(received),
        "duplicates": len(got_live) + len(got_stopped) - len(set(got_live) | set(got_stopped))
        if variant == "resumes" else len(got_live) - len(set(got_live)),
        "live_got": len(got_live), "stopped_got": len(got_stopped),
        "quiet": quiet, "settle_s": settle_s, "flooder_replies": flooder["replies"],
        "events": {name: sum(1 for e in seen if e["event"] == name) for name in EVENTS if any(e["event"] == name for e in seen)},
        # The fields that say how much was queued, re-routed or dropped.
        "event_details": [{**{k: e.get(k) for k in ("event", "outbox_bytes", "queued_frames", "rerouted", "lost", "not_resent")
                              if e.get(k) is not None}, "at_s": seconds_after(e, flood_started)} for e in seen],
    }


def seconds_after(event: dict, start: float) -> float | None:
    """When the broker logged `event`, in seconds after the flood began (the
    issue: the stuck instance was dropped "about 7 s later")."""
    try:
        return round(datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp() - start, 2)
    except (KeyError, ValueError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, default=DEFAULT_CHECKOUT, help="the code to run the broker from")
    parser.add_argument("--variant", choices=("resumes", "dies", "both"), default="both")
    parser.add_argument("--rate", type=float, default=5000, help="messages per second (default 5000)")
    parser.add_argument("--seconds", type=float, default=15, help="length of the flood (default 15)")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--sink", nargs=2, metavar=("PORT", "RECORD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        return run_sink(int(args.sink[0]), args.sink[1])

    variants = ("resumes", "dies") if args.variant == "both" else (args.variant,)
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.reps):
        for variant in variants:
            result = run_once(args.checkout, variant, args.rate, args.seconds)
            print(json.dumps(result), flush=True)
            results[variant].append(result)
    for variant, runs in results.items():
        def span(key):
            values = [r[key] for r in runs]
            return f"{statistics.median(values):g} [{min(values):g}-{max(values):g}]"
        events = sorted({name for r in runs for name in r["events"]})
        print(f"== {variant} ({args.checkout}, n={len(runs)}): lost {span('lost')}, duplicates {span('duplicates')}, "
              f"stopped got {span('stopped_got')}, achieved rate {span('achieved_rate')}/s; events: {', '.join(events) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
