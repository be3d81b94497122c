"""A command-line front end of the todo application.

    python web.py add "buy milk"
    python web.py list
    python web.py list --pin 1      # only todos 1.x.y may answer
    python web.py search milk

Prints the answer's payload as JSON; exits 1 with a message on stderr when
no answer comes in time.
"""

import argparse
import json
import os
import sys

import trio

from exocom.logs import configure
from exocom.relay import RelayError, open_relay

from common import tls_arguments, tls_context


async def run(url: str, command: str, text: str | None, timeout: float, pin: str | None = None, ssl_context=None,
              token: str | None = None):
    async with open_relay(url, "web", connect_timeout=timeout, ssl_context=ssl_context, token=token) as relay:
        if command == "add":
            answer = await relay.request("todos.create", {"title": text}, timeout=timeout, version=pin)
        elif command == "list":
            answer = await relay.request("todos.list", timeout=timeout, version=pin)
        else:
            answer = await relay.request("todo-search.query", {"text": text or "*"}, timeout=timeout, version=pin)
        print(json.dumps(answer.payload))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("add", "list", "search"))
    parser.add_argument("text", nargs="?")
    parser.add_argument("--url", default=os.environ.get("EXOCOM_URL", "ws://127.0.0.1:4100/services"))
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--pin", metavar="VERSION",
                        help='version requirement of the receiving service: "1" (any 1.x.y), "1.2" or "1.2.3"')
    tls_arguments(parser)
    parser.add_argument("--token", default=None, help="web's token, if the routing file gives it one "
                                                       "(default: $EXOCOM_TOKEN)")
    args = parser.parse_args()
    configure(None, "warning", stream=sys.stderr)  # stdout carries the answers (`web.py list | jq`)
    try:
        trio.run(run, args.url, args.command, args.text, args.timeout, args.pin, tls_context(args), args.token)
    except RelayError as e:
        print(f"web.py {args.command}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
