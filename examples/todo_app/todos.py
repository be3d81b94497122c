"""The todos service: keeps todo entries in SQLite.

Receives `todos.create` ({"title"}) and `todos.list`; answers
`todos.created` and `todos.listing`.
"""

import sqlite3

from common import parse_args, serve_forever


def main():
    args = parse_args(__doc__, "1.0.0", lambda p: p.add_argument("--db", default="todos.sqlite3"))
    db = sqlite3.connect(args.db, isolation_level=None)
    db.execute("CREATE TABLE IF NOT EXISTS todos (id INTEGER PRIMARY KEY, title TEXT NOT NULL)")

    def setup(relay):
        @relay.handler("todos.create")
        async def create(message):
            cursor = db.execute("INSERT INTO todos (title) VALUES (?)", (message.payload["title"],))
            await message.reply("todos.created", {"id": cursor.lastrowid, "title": message.payload["title"]})

        @relay.handler("todos.list")
        async def list_todos(message):
            rows = db.execute("SELECT id, title FROM todos ORDER BY id").fetchall()
            await message.reply("todos.listing", [{"id": i, "title": t} for i, t in rows])

    serve_forever(args, "todos", args.version, setup)


if __name__ == "__main__":
    main()
