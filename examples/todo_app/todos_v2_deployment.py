"""The deployment script of todos 2.0.0 (examples/todo_app/todos_v2.py).

Offline, before 2.0.0 may take production traffic: copy every todo of
todos 1.x into 2.0.0 -- read them with `todos.list` pinned to version "1",
write them with `todos.import`, which only 2.0.0 receives -- then read
version 1 again and copy what was added meanwhile, until nothing is new.
Online, once 2.0.0 serves: check that it has every todo of version 1.
Both steps are safe to run twice (the import keeps ids).

    python todos_v2_deployment.py [--url ws://127.0.0.1:4100/services] [--pause 0.5 --batch-size 1]

Routing: config/todo-app-v2.yml (roles todos-v2-deployment and
todos-v2-reader).
"""

import trio
from common import parse_args

from exocom.relay import DeploymentScript, Relay, open_relay

SCRIPT_ROLE = "todos-v2-deployment"
# The contract lets a deployment script pin a message to the old version
# (`script.request("todos.list", version="1")`), but the broker currently
# sends every message of a deployment script for role R to the version it
# deploys, pinned or not (see tests/test_relay.py::
# test_a_deployment_script_can_pin_its_messages_to_the_old_version). Until
# that is fixed, the script reads version 1 through a second connection under
# a role of its own, whose messages are routed like anybody's.
READER_ROLE = "todos-v2-reader"


class Migration:
    def __init__(self, reader: Relay, batch_size: int, pause: float):
        self.reader = reader
        self.batch_size = batch_size
        self.pause = pause

    async def read_v1(self) -> list[dict]:
        return (await self.reader.request("todos.list", version="1", timeout=30)).payload

    async def offline(self, script: Relay) -> None:
        copied: set[int] = set()
        while True:
            new = [todo for todo in await self.read_v1() if todo["id"] not in copied]
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
        v1 = {t["id"] for t in await self.read_v1()}
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

    async def run():
        async with open_relay(args.url, READER_ROLE) as reader:
            migration = Migration(reader, args.batch_size, args.pause)
            script = DeploymentScript("todos", "2.0.0", offline=migration.offline, online=migration.online)
            async with open_relay(args.url, SCRIPT_ROLE, args.version, setup=script.attach):
                await trio.sleep_forever()

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
