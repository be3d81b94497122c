"""The todos service, version 2.0.0: a new schema (a `done` flag and a
creation time per todo) in a database of its own.

Receives `todos.create` ({"title"}), `todos.list` and -- only version 2
receives it (see config/todo-app-v2.yml) -- `todos.import` ({"todos": [{"id",
"title"}, ...]}), with which its deployment script copies the todos of
version 1 into it. Answers `todos.created`, `todos.listing` and
`todos.imported` ({"imported": n, "total": n}).
"""

import sqlite3
from datetime import datetime, timezone

from common import parse_args, serve_forever

SCHEMA = """
CREATE TABLE IF NOT EXISTS todos (
    id         INTEGER PRIMARY KEY,
    title      TEXT    NOT NULL,
    done       INTEGER NOT NULL DEFAULT 0,
    created_at TEXT    NOT NULL
)
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def as_json(row) -> dict:
    todo_id, title, done, created_at = row
    return {"id": todo_id, "title": title, "done": bool(done), "created_at": created_at}


def main():
    args = parse_args(__doc__, "2.0.0", lambda p: p.add_argument("--db", default="todos-v2.sqlite3"))
    db = sqlite3.connect(args.db, isolation_level=None)
    db.execute(SCHEMA)

    def setup(relay):
        @relay.handler("todos.create")
        async def create(message):
            created_at = now()
            cursor = db.execute("INSERT INTO todos (title, done, created_at) VALUES (?, 0, ?)",
                                (message.payload["title"], created_at))
            await message.reply("todos.created", as_json((cursor.lastrowid, message.payload["title"], 0, created_at)))

        @relay.handler("todos.list")
        async def list_todos(message):
            rows = db.execute("SELECT id, title, done, created_at FROM todos ORDER BY id").fetchall()
            await message.reply("todos.listing", [as_json(row) for row in rows])

        @relay.handler("todos.import")
        async def import_todos(message):
            # Keeps the ids of version 1. Importing a todo again updates its
            # title and keeps its done flag: a deployment step may run twice.
            todos = message.payload["todos"]
            with db:
                db.execute("BEGIN")
                db.executemany(
                    "INSERT INTO todos (id, title, done, created_at) VALUES (?, ?, 0, ?) "
                    "ON CONFLICT (id) DO UPDATE SET title = excluded.title",
                    [(t["id"], t["title"], now()) for t in todos])
            total = db.execute("SELECT count(*) FROM todos").fetchone()[0]
            await message.reply("todos.imported", {"imported": len(todos), "total": total})

    serve_forever(args, "todos", args.version, setup)


if __name__ == "__main__":
    main()
