"""A command-line front end of the todo application.

    python web.py add "buy milk"
    python web.py list
    python web.py search milk
"""

import argparse
import json
import os

import trio

from exocom.logs import configure
from exocom.relay import open_relay


async def run(url: str, command: str, text: str | None, timeout: float):
    async with open_relay(url, "web") as relay:
        if command == "add":
            answer = await relay.request("todos.create", {"title": text}, timeout=timeout)
        elif command == "list":
            answer = await relay.request("todos.list", timeout=timeout)
        else:
            answer = await relay.request("todo-search.query", {"text": text or "*"}, timeout=timeout)
        print(json.dumps(answer.payload))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("add", "list", "search"))
    parser.add_argument("text", nargs="?")
    parser.add_argument("--url", default=os.environ.get("EXOCOM_URL", "ws://127.0.0.1:4100/services"))
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    configure(None, "warning")
    trio.run(run, args.url, args.command, args.text, args.timeout)


if __name__ == "__main__":
    main()
