"""The deployment script of todo-search 0.0.1, as in the tutorial: nothing to
do offline; online, read all todos and add each to search.

    python todo_search_deployment.py [--url ws://127.0.0.1:4100/services]
    python todo_search_deployment.py --deploys 0.0.2 --role todo-search-0.0.2-deployment --fill offline

The second form deploys another version (each deployment script is a role of
its own in the routing, config/todo-app-v3.yml) and fills its index in the
offline step: a version with a rollout takes production traffic as soon as
its offline step is done, so its index must be full by then.
"""

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
    def options(parser):
        parser.add_argument("--deploys", default="0.0.1", metavar="VERSION",
                            help="the version of todo-search it deploys (default 0.0.1)")
        parser.add_argument("--role", default="todo-search-deployment",
                            help="its role in the routing (default todo-search-deployment)")
        parser.add_argument("--fill", choices=("offline", "online"), default="online",
                            help="the step that fills the search index (default online, as in the tutorial)")

    args = parse_args(__doc__, extra=options)
    script = DeploymentScript("todo-search", args.deploys, **{args.fill: fill_search_index})
    serve_forever(args, args.role, args.version, script.attach)


if __name__ == "__main__":
    main()
