"""The deployment script of todo-search 0.0.1, as in the tutorial: nothing to
do offline; online, read all todos and add each to search."""

import trio
from common import parse_args, serve_forever

from exocom.relay import DeploymentScript, RequestTimeout


async def read_all_todos(relay):
    # The broker starts the step once todo-search 0.0.1 and this script are
    # connected; todos may still be starting, and a message nobody receives
    # is dropped. So ask again until todos answers (reading twice is harmless).
    with trio.fail_after(60):
        while True:
            try:
                return (await relay.request("todos.list", timeout=2)).payload
            except RequestTimeout:
                relay.log.info("todos did not answer todos.list yet; asking again")


async def fill_search_index(relay):
    for todo in await read_all_todos(relay):
        await relay.request("todo-search.add", todo, timeout=30)


def main():
    args = parse_args(__doc__)
    script = DeploymentScript("todo-search", "0.0.1", online=fill_search_index)
    serve_forever(args.url, "todo-search-deployment", args.version, script.attach)


if __name__ == "__main__":
    main()
