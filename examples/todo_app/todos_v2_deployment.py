"""The deployment script of todos 2.0.0 (examples/todo_app/todos_v2.py).

Offline, before 2.0.0 may take production traffic: copy every todo of
todos 1.x into 2.0.0 -- read them with `todos.list` pinned to version "1",
write them with `todos.import`, which only 2.0.0 receives -- then read
version 1 again and copy what was added meanwhile, until nothing is new.
Online, once 2.0.0 serves: check that it has every todo of version 1.
Both steps are safe to run twice (the import keeps ids).

    python todos_v2_deployment.py [--url ws://127.0.0.1:4100/services] [--pause 0.5 --batch-size 1]

Routing: config/todo-app-v2.yml (role todos-v2-deployment).
"""

import trio
from common import parse_args, serve_forever

from exocom.relay import DeploymentScript, Relay

SCRIPT_ROLE = "todos-v2-deployment"


class Migration:
    def __init__(self, batch_size: int, pause: float):
        self.batch_size = batch_size
        self.pause = pause

    @staticmethod
    async def read_v1(script: Relay) -> list[dict]:
        # Pinned to version "1": while 2.0.0 is held, the script's other
        # messages to `todos` reach 2.0.0, this one reaches todos 1.x.
        return (await script.request("todos.list", version="1", timeout=30)).payload

    async def offline(self, script: Relay) -> None:
        copied: set[int] = set()
        while True:
            new = [todo for todo in await self.read_v1(script) if todo["id"] not in copied]
            if not new:
                break
            for i in range(0, len(new), self.batch_size):
                batch = [{"id": t["id"], "title": t["title"]} for t in new[i:i + self.batch_size]]
                # While 2.0.0 is held, the script's messages to `todos` reach 2.0.0 only.
                answer = await script.request("todos.import", {"todos": batch}, timeout=30)
                copied.update(t["id"] for t in batch)
                script.log.info("todos copied to 2.0.0", titles=[t["title"] for t in batch], **answer.payload)
                if self.pause:
                    await trio.sleep(self.pause)
        script.log.info("version 1 and 2.0.0 agree", todos=len(copied))

    async def online(self, script: Relay) -> None:
        v1 = {t["id"] for t in await self.read_v1(script)}
        # 2.0.0 is live now: it answers `todos.list` without a pin.
        v2 = {t["id"] for t in (await script.request("todos.list", timeout=30)).payload}
        missing = sorted(v1 - v2)
        if missing:
            raise RuntimeError(f"todos {missing} of version 1 are missing in 2.0.0")
        script.log.info("2.0.0 has every todo of version 1", todos=len(v1))


def main():
    def options(parser):
        parser.add_argument("--batch-size", type=int, default=100, help="todos per todos.import (default 100)")
        parser.add_argument("--pause", type=float, default=0.0,
                            help="seconds to wait after each batch (to watch a long migration; default 0)")

    args = parse_args(__doc__, extra=options)
    migration = Migration(args.batch_size, args.pause)
    script = DeploymentScript("todos", "2.0.0", offline=migration.offline, online=migration.online)
    serve_forever(args, SCRIPT_ROLE, args.version, script.attach)


if __name__ == "__main__":
    main()
