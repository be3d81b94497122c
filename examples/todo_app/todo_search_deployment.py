"""The deployment script of todo-search 0.0.1, as in the tutorial: nothing to
do offline; online, read all todos and add each to search."""

from common import parse_args, serve_forever

from exocom.relay import DeploymentScript


async def fill_search_index(relay):
    listing = await relay.request("todos.list", timeout=30)
    for todo in listing.payload:
        await relay.request("todo-search.add", todo, timeout=30)


def main():
    args = parse_args(__doc__)
    script = DeploymentScript("todo-search", "0.0.1", online=fill_search_index)
    serve_forever(args.url, "todo-search-deployment", args.version, script.attach)


if __name__ == "__main__":
    main()
