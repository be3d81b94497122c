"""The todo-search service: a small full-text index (SQLite FTS5, in the
file --db, so that it survives a restart: its deployment script runs once).

Receives `todo-search.add` ({"id", "title"}) and `todo-search.query`
({"text"}); answers `todo-search.added` and `todo-search.results`.
"""

import sqlite3

from common import parse_args, serve_forever


def main():
    args = parse_args(__doc__, "0.0.1", lambda p: p.add_argument("--db", default="todo-search.sqlite3"))
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
            text = message.payload["text"]
            if text == "*":
                rows = index.execute("SELECT todo_id, title FROM docs ORDER BY todo_id").fetchall()
            else:
                phrase = '"' + text.replace('"', '""') + '"'
                rows = index.execute("SELECT todo_id, title FROM docs WHERE docs MATCH ? ORDER BY rank",
                                     (phrase,)).fetchall()
            await message.reply("todo-search.results", [{"id": i, "title": t} for i, t in rows])

    serve_forever(args.url, "todo-search", args.version, setup)


if __name__ == "__main__":
    main()
