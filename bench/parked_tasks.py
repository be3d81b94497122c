"""Does trio's cost per wake-up grow with the number of parked connections?

A ping-pong between two trio tasks over a socketpair while K other sockets
sit in `wait_readable` (each a parked task with its descriptor registered in
epoll, as an idle instance's reader is in the broker). Prints the process's
CPU time per round trip, which is what bench/growth.py measures on the broker.

    .venv/bin/python bench/parked_tasks.py K [ROUNDS]      # e.g. 100, then 9000

K is at most about half the file descriptor limit (a socketpair is two).
"""

import resource
import socket
import sys
import time

import trio


async def main(k: int, rounds: int) -> None:
    idle = [socket.socketpair() for _ in range(k)]
    a, b = trio.socket.socketpair()

    async def park(sock: socket.socket) -> None:
        await trio.lowlevel.wait_readable(sock)

    async def echo() -> None:
        while True:
            await b.send(await b.recv(100))

    async with trio.open_nursery() as nursery:
        for sock, _ in idle:
            nursery.start_soon(park, sock)
        nursery.start_soon(echo)
        await trio.sleep(0.2)
        for _ in range(1000):  # warm-up
            await a.send(b"x" * 100)
            await a.recv(100)
        started = time.process_time()
        for _ in range(rounds):
            await a.send(b"x" * 100)
            await a.recv(100)
        print(f"K={k}: {(time.process_time() - started) / rounds * 1e6:.2f} us CPU per round trip")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    trio.run(main, int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 20_000)
