"""The todo-search service: a small full-text index (SQLite FTS5, in the
file --db, so that it survives a restart: its deployment script runs once).

Receives `todo-search.add` ({"id", "title"}) and `todo-search.query`
({"text"}); answers `todo-search.added` and `todo-search.results`.

`--fail-rate 1` makes a faulty version: that share of its searches is
answered with `todo-search.failed` ({"error", "version"}) instead, which a
rollout with `errorMessages: [todo-search.failed]` counts as errors
(`exocom demo`, part 3; config/todo-app-v3.yml).
"""

import random
import sqlite3

from common import parse_args, serve_forever


def main():
    def options(parser):
        parser.add_argument("--db", default="todo-search.sqlite3")
        parser.add_argument("--fail-rate", type=float, default=0.0, metavar="SHARE",
                            help="share of searches (0 to 1) answered with todo-search.failed (default 0)")

    args = parse_args(__doc__, "0.0.1", options)
    index = sqlite3.connect(args.db, isolation_level=None)
    index.execute("CREATE VIRTUAL TABLE IF NOT EXISTS docs USING fts5(todo_id UNINDEXED, title)")

    def setup(relay):
        @relay.handler("todo-search.add")
        async def add(message):
            todo = message.payload
            index.execute("DELETE FROM docs WHERE todo_id = ?", (todo["id"],))
            index.execute("INSERT INTO docs (todo_id, title) VALUES (?, ?)", (todo["id"], todo["title"]))
            await message.reply("todo-search.added", {"id": todo["id"]})

        @relay.handler("todo-search.query")
        async def query(message):
            if args.fail_rate and random.random() < args.fail_rate:
                await message.reply("todo-search.failed", {"error": "the search index cannot be read",
                                                           "version": args.version})
                return
            text = message.payload["text"]
            if text == "*":
                rows = index.execute("SELECT todo_id, title FROM docs ORDER BY todo_id").fetchall()
            else:
                phrase = '"' + text.replace('"', '""') + '"'
                rows = index.execute("SELECT todo_id, title FROM docs WHERE docs MATCH ? ORDER BY rank",
                                     (phrase,)).fetchall()
            await message.reply("todo-search.results", [{"id": i, "title": t} for i, t in rows])

    serve_forever(args, "todo-search", args.version, setup)


if __name__ == "__main__":
    main()
