"""The Redis side of a cluster (`exocom serve --cluster redis://...`): moves
bytes between the core's cluster decisions (`core.cluster`, `core.presence`)
and Redis, in four tasks under the server's nursery:

- presence: every `RENEW` seconds, SET this broker's holding (and what it
  saw of each ramp, for the gates) with a `LEASE` expiry, read every other
  broker's (one pipeline, then one MGET), and PUBLISH it when the holding
  changed;
- subscriber: takes those announcements at once, between renewals;
- sender: appends the entries the core hands to other brokers (`HandOver`)
  to their streams, in pipelined batches, from a bounded buffer;
- receiver: reads this broker's stream with a consumer group (blocking read
  on a client of its own), has the core deliver each entry, then XACKs and
  XDELs the batch in the same round trip as the next read: an entry is
  acknowledged only after its delivery;
- leases: every `LEASE_RENEW` seconds, takes or renews the driver lease of
  every deployment the core wants to drive (`core.leases`), after reading
  the ledger records other brokers appended meanwhile.

The ledger is a Redis list of records (`LEDGER`). A record is appended by a
Lua script only while the deployment's lease key holds the writer's fencing
token (`write_record`), so that a broker paused past its lease cannot record
a step after another broker took over.

coredis is imported only here, and this module only when clustered. It runs
natively under trio (anyio); a blocking stream read cancels cleanly and
does not hold up the client's other commands (valkey-glide's does).

When Redis is away, every task retries with backoff; entries for other
brokers wait in the buffer (at most `max_buffered`; beyond, a message is
dropped and counted, as one nobody receives), and `/readyz` says why.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import time
from urllib.parse import parse_qs, urlsplit, urlunsplit

import anyio
import coredis
import orjson
import trio
from coredis.exceptions import RedisError, ResponseError, StreamDuplicateConsumerGroupError

from ..logs import get_logger

# One hash tag for every key: on a Redis Cluster they all live in one slot, so the ledger and lease scripts and
# the presence MGET (several keys each) stay legal. A cluster of brokers is not sharded over Redis nodes.
PREFIX = "{exocom}:"
BROKERS = PREFIX + "brokers"  # set of broker ids that announced themselves (pruned when their key expired)
CHANNEL = PREFIX + "presence"
GROUP = "brokers"
RENEW = 0.3  # seconds between presence renewals
LEASE = 2.0  # seconds a presence lasts without renewal
BATCH = 512  # entries per pipeline or stream read
STREAM_MAX = 100_000  # entries a broker's stream keeps at most (approximately) while it reads none
BLOCK_MS = 1000
_TRIM = {"trim_strategy": coredis.PureToken.MAXLEN, "threshold": STREAM_MAX,
         "trim_operator": coredis.PureToken.APPROXIMATELY}
MAX_BACKOFF = 2.0
LEDGER = PREFIX + "ledger"  # list of {"by", "token", "record"}: index + 1 is a record's sequence number
FENCE = PREFIX + "fence"  # the last fencing token granted
LEASE_TTL = 3.0  # seconds a deployment's driver lease lasts without renewal
LEASE_RENEW = 0.5
REPLICA_WAIT_MS = 1000  # through Sentinel: how long a ledger record waits for a replica to confirm it

# Take the lease if free, renew it if ours: {1, token} or {0, holder}.
TAKE_LEASE = """
local current = redis.call('GET', KEYS[1])
if current then
  local holder, token = string.match(current, '^(.*)/(%d+)$')
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, token}
  end
  return {0, holder or current}
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '/' .. token, 'PX', ARGV[2])
return {1, tostring(token)}
"""
# Hand a lease back, if it is still the caller's.
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# Append a record only under the lease the writer holds (fencing): its sequence number. Without a token
# (ARGV[1] empty: an operator's action on a deployment this broker does not drive, a rollback of a version
# without one) only while no other broker holds the lease (ARGV[3]: the writer).
APPEND_RECORD = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '' then
  local holder = current and string.match(current, '^(.*)/%d+$')
  if current and holder ~= ARGV[3] then
    return redis.error_reply('FENCED ' .. (holder or current))
  end
elseif current ~= ARGV[1] then
  return redis.error_reply('FENCED the writer does not hold this deployment lease with this token')
end
return redis.call('RPUSH', KEYS[2], ARGV[2])
"""


def lease_key(deployment: str) -> str:
    return f"{PREFIX}lease:{deployment}"


class PersistenceTooWeak(Exception):
    pass


async def open_ledger(url: str, password: str | None, *, volatile_ok: bool) -> tuple[list[dict], list[str], bool]:
    """At startup, before the broker is built: every record of the shared ledger, warnings
    about Redis's persistence, and whether Redis is a Redis Cluster. PersistenceTooWeak (saying
    what to set) when Redis would lose acknowledged records on a restart, unless `volatile_ok`."""
    warnings = []
    async with _client(url, password, False) as client:
        redis_cluster = (await client.info("cluster")).get("cluster_enabled") == 1
        try:
            config = await client.config_get(["appendonly", "appendfsync"])
        except ResponseError as e:
            config = None
            warnings.append(f"cannot read Redis's persistence settings ({e}): make sure it runs with appendonly yes "
                            "and appendfsync always, or a step recorded done may run again after Redis restarts")
    if config is not None:
        appendonly = config.get(b"appendonly", b"").decode()
        appendfsync = config.get(b"appendfsync", b"").decode()
        if appendonly != "yes":
            problem = (f"Redis at {shown_url(url)} does not persist writes (appendonly {appendonly}): after "
                       "a Redis restart the ledger is empty and every deployment step runs again. Set "
                       "`appendonly yes` and `appendfsync always` (redis.conf, or CONFIG SET and CONFIG "
                       "REWRITE)")
            if not volatile_ok:
                raise PersistenceTooWeak(problem + ", or pass --cluster-volatile-ledger to accept that")
            warnings.append(problem)
        elif appendfsync != "always":
            warnings.append(f"Redis at {shown_url(url)} syncs its append-only file {appendfsync}, not always: "
                            "a Redis crash may lose the last records, and a step recorded done in them runs "
                            "again. Set `appendfsync always` for the guarantee")
        if redis_cluster:
            warnings.append(f"a Redis Cluster: only the node at {shown_url(url)} was checked; every node that may "
                            "hold the ledger's slot needs the same persistence settings")
    async with _client(url, password, redis_cluster) as client:
        entries = await client.lrange(LEDGER, 0, -1)
    return [orjson.loads(entry)["record"] for entry in entries], warnings, redis_cluster


TIMEOUTS = {"connect_timeout": 2.0, "stream_timeout": 5.0}
SENTINEL = "redis+sentinel://"
SENTINEL_PORT = 26379


def _client(url: str, password: str | None, redis_cluster: bool) -> contextlib.AbstractAsyncContextManager:
    """A client to enter: on a Redis Cluster, found from any of its nodes (the client follows MOVED and learns
    the slots); through Sentinel, on the primary the sentinels name (asked again on every new connection)."""
    if url.startswith(SENTINEL):
        return _through_sentinel(url, password)
    kind = coredis.RedisCluster if redis_cluster else coredis.Redis
    return kind.from_url(_hostname_checked(url), password=password, **TIMEOUTS)


def _hostname_checked(url: str) -> str:
    """A rediss:// URL that also has the certificate checked against the host name. coredis (6.9) builds the TLS
    context from the URL's ssl_* parameters and, unless `ssl_check_hostname` is given, verifies the chain only: any
    certificate the CA signed, for whatever name, would do. A URL that says ssl_check_hostname is kept as it is."""
    parts = urlsplit(url)
    if parts.scheme != "rediss" or "ssl_check_hostname" in parse_qs(parts.query):
        return url
    return urlunsplit(parts._replace(query="&".join(filter(None, (parts.query, "ssl_check_hostname=true")))))


def sentinel_address(url: str) -> tuple[list[tuple[str, int]], str]:
    """The sentinels and the primary's name in redis+sentinel://HOST[:PORT][,HOST[:PORT]...]/NAME
    (ValueError saying what is wrong)."""
    netloc, _, name = url.removeprefix(SENTINEL).partition("/")
    if "@" in netloc:
        raise ValueError("give the password with --cluster-password-file, not in the URL")
    if not name or "/" in name or "?" in name:
        raise ValueError("name the primary after the sentinels: redis+sentinel://HOST:PORT[,HOST:PORT]/NAME")
    sentinels = []
    for address in netloc.split(","):
        host, _, port = address.rpartition(":") if ":" in address else (address, "", str(SENTINEL_PORT))
        if not host or not port.isdigit():
            raise ValueError(f"{address!r} is not HOST:PORT")
        sentinels.append((host, int(port)))
    return sentinels, name


@contextlib.asynccontextmanager
async def _through_sentinel(url: str, password: str | None):
    """The primary of the service that the sentinels monitor. The password is the primary's (and its replicas');
    the sentinels are asked without one. coredis's SentinelConnectionPool asks the sentinels for the primary's
    address whenever it opens a connection and checks ROLE on it, so after a failover the reconnecting tasks
    reach the new primary."""
    from coredis.connection import TCPLocation
    sentinels, name = sentinel_address(url)
    async with coredis.Sentinel([TCPLocation(host, port) for host, port in sentinels], sentinel_kwargs=dict(TIMEOUTS),
                                password=password, **TIMEOUTS) as sentinel:
        async with sentinel.primary_for(name) as primary:
            yield primary


# What a command raises when Redis is away or the connection broke (coredis passes anyio's own through).
REDIS_AWAY = (RedisError, OSError, anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream)


def reason(error: BaseException) -> str:
    """What went wrong, with why: coredis says "Unable to establish a connection to HOST:PORT" and keeps the
    why (refused, a certificate that does not verify, a name it is not for) as the cause. Its task groups may
    wrap the error in groups of one."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    text = str(error) or error.__class__.__name__
    cause = error.__cause__
    return f"{text}: {cause}" if cause is not None and str(cause) and str(cause) not in text else text


def presence_key(broker: str) -> str:
    return f"{PREFIX}broker:{broker}"


def stream_key(broker: str) -> str:
    return f"{PREFIX}inbox:{broker}"


def shown_url(url: str) -> str:
    """The URL without its password, for logs and status."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


class RecordOutcome:
    """What the shared ledger did with one record (an operator's action waits for it)."""

    def __init__(self) -> None:
        self.settled = trio.Event()
        self.refused_by: str | None = None  # the broker that holds the deployment's lease, when refused


class ClusterLink:
    def __init__(self, url: str, broker_id: str, *, password: str | None = None, max_buffered: int = 10_000,
                 ledger_records: int = 0):
        self.url = url
        self.lease_ttl = LEASE_TTL
        self.redis_cluster = False  # a Redis Cluster rather than one Redis (found by `open_ledger`)
        self.known = ledger_records  # ledger records this broker has applied, in ledger order
        self.own: set[int] = set()  # sequence numbers of the records this broker appended (applied already)
        self.password = password
        self.me = broker_id
        self.max_buffered = max_buffered
        self.log = get_logger()
        self.buffer: collections.deque[tuple[str, bytes]] = collections.deque()
        self._wake = trio.Event()
        self.dropped = 0  # entries refused because the buffer was full
        self.problem: str | None = "not connected to Redis yet"
        self._failing: set[str] = set()  # tasks whose last Redis command failed
        self._watched: dict[int, RecordOutcome] = {}  # id(record) -> its outcome, for whoever waits for it

    def watch(self, record: dict) -> RecordOutcome:
        """The outcome of `record`, once `write_record` has appended it or the ledger refused it."""
        outcome = self._watched[id(record)] = RecordOutcome()
        return outcome

    def _settle(self, record: dict, refused_by: str | None) -> None:
        outcome = self._watched.pop(id(record), None)
        if outcome is not None:
            outcome.refused_by = refused_by
            outcome.settled.set()

    # ---------------------------------------------------------- from execute

    def hand_over(self, broker: str, data: bytes) -> None:
        if len(self.buffer) >= self.max_buffered:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                self.log.warning("cluster buffer full", broker=broker, buffered=len(self.buffer),
                                 dropped=self.dropped, reason=(
                                     f"{self.max_buffered} messages for other brokers wait for Redis already; "
                                     "this one is dropped: bring Redis back (see /readyz)"))
            return
        self.buffer.append((broker, data))
        self._wake.set()

    # --------------------------------------------------------------- health

    def _failed(self, task: str, error: BaseException) -> None:
        if not self._failing:
            self.log.error("cluster redis unreachable", url=shown_url(self.url), task=task, error=reason(error),
                           buffered=len(self.buffer), hint=(
                               "local services keep talking; messages for other brokers wait in memory "
                               f"(at most {self.max_buffered}); check that Redis runs and is reachable"))
        self._failing.add(task)
        self.problem = f"Redis at {shown_url(self.url)} is unreachable: {reason(error)}"

    def _ok(self, task: str) -> None:
        if task in self._failing or self.problem is not None:
            self._failing.discard(task)
            if not self._failing:
                if self.problem is not None and self.problem != "not connected to Redis yet":
                    self.log.info("cluster redis back", url=shown_url(self.url), buffered=len(self.buffer))
                self.problem = None

    @property
    def kind(self) -> str:
        """What `--cluster` names: a Redis Cluster, a primary found through Sentinel, or one Redis."""
        return "cluster" if self.redis_cluster else "sentinel" if self.url.startswith(SENTINEL) else "single"

    @property
    def shown_url(self) -> str:
        return shown_url(self.url)

    def check(self) -> dict:
        """The `cluster` check of /readyz."""
        body = {"url": shown_url(self.url), "broker": self.me, "buffered": len(self.buffer), "dropped": self.dropped,
                "failing": sorted(self._failing)}
        if self.problem is None:
            return {"ok": True, **body}
        return {"ok": False, **body, "error": self.problem}

    # ---------------------------------------------------------------- tasks

    def _client(self) -> contextlib.AbstractAsyncContextManager:
        return _client(self.url, self.password, self.redis_cluster)

    async def run(self, server, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._holding_changed = trio.Event()
        server.broker.registry.changed = lambda: self._holding_changed.set()
        async with self._client() as commands, self._client() as reads, trio.open_nursery() as nursery:
            nursery.start_soon(self._retrying, "presence", self._presence, server, commands)
            nursery.start_soon(self._retrying, "subscriber", self._subscriber, server, commands)
            nursery.start_soon(self._retrying, "sender", self._sender, commands)
            nursery.start_soon(self._retrying, "receiver", self._receiver, server, reads)
            nursery.start_soon(self._retrying, "leases", self._leases, server, commands)
            self.commands = commands
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                # On a client of its own: the clients above lose their connections when cancelled.
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    await self._leave()

    async def _retrying(self, task: str, body, *args) -> None:
        delay = 0.1
        while True:
            failed = None
            # except*: coredis's pub/sub raises ClosedResourceError beside trio's Cancelled when it unsubscribes
            # on a connection closed by the cancellation (at every stop); that part is Redis going away, the
            # Cancelled goes on up as it should.
            try:
                await body(*args)
            except* REDIS_AWAY as group:
                failed = group
            while isinstance(failed, BaseExceptionGroup):
                failed = failed.exceptions[0]
            if failed is not None:  # else the body ended (a subscription closed by Redis): start it again
                self._failed(task, failed)
            await trio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    async def _presence(self, server, commands: coredis.Redis) -> None:
        cluster = server.broker.cluster
        published = None
        while True:
            holding = cluster.holding()
            expires_at = time.time() + LEASE
            payload = orjson.dumps({"broker": self.me, "roles": holding, "expiresAt": expires_at,
                                    "ramps": server.broker.ramps.seen_here()})
            async with commands.pipeline(transaction=False) as pipe:
                pipe.set(presence_key(self.me), payload, px=int(LEASE * 1000))
                pipe.sadd(BROKERS, [self.me])
                if holding != published:
                    pipe.publish(CHANNEL, payload)
                members = pipe.smembers(BROKERS)
            published = holding
            brokers = sorted(m.decode() for m in await members if m.decode() != self.me)
            values = await commands.mget([presence_key(b) for b in brokers]) if brokers else ()
            now = time.time()
            actions, gone = [], []
            for broker, value in zip(brokers, values):
                if value is None:
                    gone.append(broker)
                else:
                    actions += self._seen(server, value, now)
            if gone:
                await commands.srem(BROKERS, gone)
            server.execute(actions)
            self._ok("presence")
            await self._until_renewal_or_change()

    async def _until_renewal_or_change(self) -> None:
        """Sleep until the next renewal, or until an instance came or went or a state changed here: the
        others learn it within milliseconds (PUBLISH), not at the next renewal."""
        with trio.move_on_after(RENEW):
            await self._holding_changed.wait()
        self._holding_changed = trio.Event()

    @staticmethod
    def _seen(server, value: bytes, now: float) -> list:
        try:
            announced = orjson.loads(value)
            return server.broker.cluster.presence_seen(announced["broker"], announced["roles"],
                                                       announced["expiresAt"], now, announced.get("ramps"))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return []  # another program's key: not a presence

    async def _subscriber(self, server, commands: coredis.Redis) -> None:
        async with commands.pubsub(channels=[CHANNEL]) as pubsub:
            self._ok("subscriber")
            async for message in pubsub:
                if message["type"] == "message":
                    data = message["data"]
                    if data.startswith(b"{"):
                        server.execute(self._seen(server, data, time.time()))
                    else:
                        server.execute(server.broker.cluster.presence_left(data.decode(), time.time()))

    async def _sender(self, commands: coredis.Redis) -> None:
        buffer = self.buffer
        while True:
            if not buffer:
                self._wake = trio.Event()
                await self._wake.wait()
            await self._send_batch(commands)
            self._ok("sender")

    async def _send_batch(self, commands: coredis.Redis) -> None:
        """The oldest buffered entries (up to BATCH), taken off the buffer only once Redis has them: a failed
        pipeline sends them again (the receiver deduplicates)."""
        batch = list(itertools.islice(self.buffer, BATCH))
        if len(batch) == 1:  # request/reply one at a time: a pipeline of one costs coredis more than the command
            [(broker, data)] = batch
            await commands.xadd(stream_key(broker), {"m": data}, **_TRIM)
        else:
            async with commands.pipeline(transaction=False) as pipe:
                for broker, data in batch:
                    pipe.xadd(stream_key(broker), {"m": data}, **_TRIM)
        for _ in batch:
            self.buffer.popleft()

    async def _receiver(self, server, reads: coredis.Redis) -> None:
        stream = stream_key(self.me)
        with contextlib.suppress(StreamDuplicateConsumerGroupError):  # made by this broker id before
            await reads.xgroup_create(stream, GROUP, "0", mkstream=True)
        self._ok("receiver")
        # First what this broker id read before and never acknowledged (it stopped between the
        # delivery and the XACK), then new entries.
        position = "0"
        delivered: list = []  # the ids of the last batch, acknowledged with the next read (one round trip)
        while True:
            block = None if position == "0" else BLOCK_MS
            if delivered:
                async with reads.pipeline(transaction=False) as pipe:
                    pipe.xack(stream, GROUP, delivered)
                    pipe.xdel(stream, delivered)
                    read = pipe.xreadgroup(GROUP, self.me, {stream: position}, count=BATCH, block=block)
                result = await read
            else:
                result = await reads.xreadgroup(GROUP, self.me, {stream: position}, count=BATCH, block=block)
            delivered = []
            entries = [entry for entries in (result or {}).values() for entry in entries]
            if not entries:
                position = ">"
                continue
            now = time.time()
            handed_over = server.broker.handed_over
            for entry in entries:
                data = entry.field_values.get(b"m")
                if data is not None:
                    server.execute(handed_over(data, now))
            delivered = [entry.identifier for entry in entries]
            self._ok("receiver")

    async def _leases(self, server, commands: coredis.Redis) -> None:
        cluster = server.broker.cluster
        while True:
            names = sorted(cluster.wanted_leases())
            # Held but no longer wanted (finished, failed, its script gone): handed back at once.
            done = sorted(set(cluster.leases.held) - set(names))
            sent_at = time.time()
            async with commands.pipeline(transaction=False) as pipe:
                length = pipe.llen(LEDGER)
                answers = [pipe.eval(TAKE_LEASE, [lease_key(name), FENCE], [self.me, int(LEASE_TTL * 1000)])
                           for name in names]
                for name in done:
                    pipe.eval(RELEASE_LEASE, [lease_key(name)], [f"{self.me}/{cluster.leases.token(name)}"])
            if done:
                server.execute(cluster.leases_released(done))
            length = await length
            answers = [await answer for answer in answers]
            # The records others appended come first: a lease is driven only on the whole ledger.
            if length > self.known:
                entries = await commands.lrange(LEDGER, self.known, length - 1)
                seen = [orjson.loads(entry)["record"] for seq, entry in enumerate(entries, self.known + 1)
                        if seq not in self.own]
                self.known += len(entries)
                server.execute(cluster.records_seen(seen, time.time()))
            results = []
            for name, (granted, value) in zip(names, answers):
                value = value.decode() if isinstance(value, bytes) else str(value)
                results.append((name, int(value), None) if granted == 1 else (name, None, value))
            server.execute(cluster.leases_answered(results, sent_at, time.time()))
            self._ok("leases")
            await trio.sleep(LEASE_RENEW)

    async def write_record(self, server, record: dict) -> None:
        """Append a deployment record under this broker's lease, then have the core act on it; if the
        ledger refuses it (the lease is another broker's now), the core drops it. Retried while Redis
        is away: no step goes on meanwhile (its deployment waits for this record)."""
        cluster = server.broker.cluster
        name = f"{record['role']}@{record['version']}"
        delay = 0.1
        while True:
            token = cluster.leases.token(name)
            entry = orjson.dumps({"by": self.me, "token": token, "record": record})
            fence = f"{self.me}/{token}" if token is not None else ""
            try:
                seq, replicas = await self._append(name, fence, entry)
            except ResponseError as e:
                if "FENCED" not in str(e):
                    raise
                holder = str(e).partition("FENCED ")[2].strip() if token is None else None
                self.log.warning("deployment record fenced", deployment=name, token=token, record_event=record["event"],
                                 step=record["step"], holder=holder, reason=(
                                     "the lease in Redis is held with another token: another broker took the "
                                     "deployment over while this one was paused or cut off" if token is not None else
                                     "an operator's action, but another broker drives this deployment now: it acts "
                                     "on it, not this one"))
                server.execute(cluster.record_refused(record, time.time()))
                self._settle(record, holder or "another broker")
                return
            except REDIS_AWAY as e:
                self._failed("ledger", e)
                await trio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            self.own.add(seq)
            self._ok("ledger")
            if replicas == 0:
                self.log.warning("deployment record not on a replica", deployment=name, record_event=record["event"],
                                 step=record["step"], waited_s=REPLICA_WAIT_MS / 1000, reason=(
                                     "the primary has it, but no replica confirmed it in time: a failover before it "
                                     "does loses it (the step would run again); check the replicas (INFO "
                                     "replication on the primary)"))
            server.execute(server.broker.record_written(record, time.time()))
            self._settle(record, None)
            return

    async def _append(self, name: str, fence: str, entry: bytes) -> tuple[int, int | None]:
        """The record's sequence number, and (through Sentinel) how many replicas confirmed it: a failover
        promotes a replica, and replication is asynchronous, so the broker acts on a record only once a replica
        has it too, or after REPLICA_WAIT_MS (WAIT, on the connection that appended it: one pipeline)."""
        keys, args = [lease_key(name), LEDGER], [fence, entry, self.me]
        if self.kind != "sentinel":
            return await self.commands.eval(APPEND_RECORD, keys, args), None
        async with self.commands.pipeline(transaction=False, raise_on_error=False) as pipe:
            appended = pipe.eval(APPEND_RECORD, keys, args)
            confirmed = pipe.wait(1, REPLICA_WAIT_MS)
        return await appended, await confirmed

    async def _leave(self) -> None:
        """Stopping: hand on what is buffered, and tell the others at once instead of after the lease."""
        try:
            async with self._client() as commands:
                await self._hand_on_and_leave(commands)
        except REDIS_AWAY as e:
            self.log.warning("cluster leave failed", error=str(e) or e.__class__.__name__, lost=len(self.buffer),
                             reason="Redis was unreachable while stopping: the others forget this broker after "
                                    "its lease; the messages still buffered for them are lost")

    async def _hand_on_and_leave(self, commands: coredis.Redis) -> None:
        while self.buffer:
            await self._send_batch(commands)
        async with commands.pipeline(transaction=False) as pipe:
            pipe.delete([presence_key(self.me)])
            pipe.srem(BROKERS, [self.me])
            pipe.publish(CHANNEL, self.me)
