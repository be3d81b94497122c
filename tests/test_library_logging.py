"""The client library logs through the host program's `logging`, never to
stdout: a program's stdout is its output (`web.py list | jq`)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading

from processes import EXAMPLES, ROOT, BrokerProcess, free_port, start_example, wait_for


def forward(listener: socket.socket, port: int) -> None:
    """Accept one connection and pass its bytes both ways to the port."""
    client, _ = listener.accept()
    upstream = socket.create_connection(("127.0.0.1", port))

    def pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    for source, sink in ((client, upstream), (upstream, client)):
        threading.Thread(target=pump, args=(source, sink), daemon=True).start()


def test_web_py_stdout_is_only_its_answer_while_its_relay_warns(tmp_path):
    broker = BrokerProcess(tmp_path, "--config", str(ROOT / "config" / "todo-app.yml")).start()
    todos = start_example("todos.py", "--url", broker.url, "--db", str(tmp_path / "todos.db"), log=tmp_path / "todos.log")
    web = None
    try:
        broker.wait_registered("todos")
        # web.py first meets a closed port (its relay warns "relay cannot connect"
        # and retries), then a way through to the broker.
        port = free_port()
        out, err = tmp_path / "web.out", tmp_path / "web.err"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            web = subprocess.Popen([sys.executable, str(EXAMPLES / "web.py"), "--url",
                                    f"ws://127.0.0.1:{port}/services", "--timeout", "20", "list"],
                                   stdout=stdout, stderr=stderr, cwd=EXAMPLES)
        wait_for(lambda: "relay cannot connect" in out.read_text() + err.read_text(), what="web.py's warning")
        with socket.create_server(("127.0.0.1", port)) as listener:
            forward(listener, broker.port)
            assert web.wait(timeout=30) == 0, err.read_text()
    finally:
        for process in (web, todos):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=10)
        broker.stop()
    assert json.loads(out.read_text()) == []  # what `| jq` reads: the answer alone
    warning = json.loads(next(line for line in err.read_text().splitlines() if "relay cannot connect" in line))
    assert warning["event"] == "relay cannot connect" and warning["relay"] == "web" and warning["attempt"] == 1


PROGRAM = """
import trio
from exocom.relay import RelayError, open_relay

async def main():
    try:
        async with open_relay("ws://127.0.0.1:{port}/services", "web", connect_timeout=0.5):
            pass
    except RelayError:
        print("gave up")

trio.run(main)
"""


def test_the_relay_in_a_program_that_configured_nothing_keeps_stdout_to_the_program(tmp_path):
    # Nothing listens on the port: the relay warns, and the program prints its own line.
    result = subprocess.run([sys.executable, "-c", PROGRAM.format(port=free_port())], capture_output=True, text=True,
                            cwd=tmp_path, timeout=30)
    assert result.stdout == "gave up\n"
    # stdlib logging's last resort: warnings and errors on stderr, with their fields.
    assert "relay cannot connect relay='web' url='ws://127.0.0.1:" in result.stderr
