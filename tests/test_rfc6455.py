"""RFC 6455 end to end, over real sockets: UTF-8 in text messages, close
frames, the opening handshake, and closing a connection whose peer is still
sending (a lingering close)."""

from __future__ import annotations

import json

import pytest
import trio
from structlog.testing import capture_logs

from exocom.server.frames import CLOSE, TEXT
from exocom.server.listener import MAX_REQUEST_HEAD, Limits
from raw_ws import RawClient, client_frame
from test_http import exchange
from test_refusals import wait_for_event
from wire import new_id, running_broker

ROUTES = {"web": {"sends": ["ping"]}, "users": {"receives": ["ping"]}}
CONTINUATION = 0x0


async def registered(rb, role: str) -> RawClient:
    client = await RawClient.connect(rb.port)
    await client.send_json({"name": "exocom.register-service", "sender": role, "id": new_id()})
    await rb.wait_registered(role)
    return client


def ping(payload: str) -> bytes:
    return json.dumps({"name": "ping", "sender": "web", "id": new_id(), "payload": payload},
                      ensure_ascii=False).encode()


# ------------------------------------------------------------------ UTF-8

NOT_UTF8 = {
    "one frame": [(TEXT, ping("caf") + b"\xc3\x28", True)],
    "a surrogate": [(TEXT, ping("") + b"\xed\xa0\x80", True)],
    "split over fragments": [(TEXT, ping("")[:-2] + b"\xe2\x82", False), (CONTINUATION, b"\x28\"}", True)],
    "a character cut by the message's end": [(TEXT, ping("")[:-2], False), (CONTINUATION, b"\xe2\x82", True)],
}


@pytest.mark.parametrize("frames", NOT_UTF8.values(), ids=NOT_UTF8.keys())
async def test_a_text_message_that_is_not_utf8_closes_with_1007(frames):
    async with running_broker(ROUTES) as rb:
        async with rb.service("users") as users:
            web = await registered(rb, "web")
            with capture_logs() as logs:
                for opcode, payload, fin in frames:
                    await web.send_frame(opcode, payload, fin)
                assert await web.close_code() == 1007
                error = (await wait_for_event(logs, "protocol error"))[0]
            assert error["code"] == 1007 and "UTF-8" in error["reason"]
            await users.receive_nothing(0.1)
            await web.aclose()


async def test_a_character_split_between_fragments_is_delivered():
    async with running_broker(ROUTES) as rb:
        async with rb.service("users") as users:
            web = await registered(rb, "web")
            data = ping("café")
            cut = data.index("é".encode()) + 1
            await web.send_frame(TEXT, data[:cut], fin=False)
            await web.send_frame(CONTINUATION, data[cut:])
            assert (await users.receive())["payload"] == "café"
            await web.aclose()


# ------------------------------------------------------------------ close frames

def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


REFUSED_CLOSE = {
    "1 byte": (b"\x03", 1002),
    **{f"code {code}": (close_payload(code), 1002) for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)},
    "reason not UTF-8": (close_payload(1000, b"bye \xff"), 1007),
}
ECHOED_CLOSE = {
    "no code": (b"", 1000),
    **{f"code {code}": (close_payload(code, "bientôt".encode()), code) for code in (1000, 1001, 1011, 1014, 3000, 4999)},
}


@pytest.mark.parametrize("payload, code", [*REFUSED_CLOSE.values(), *ECHOED_CLOSE.values()],
                         ids=[*REFUSED_CLOSE.keys(), *ECHOED_CLOSE.keys()])
async def test_close_frames_are_checked_and_valid_codes_echoed(payload, code):
    async with running_broker(ROUTES) as rb:
        client = await RawClient.connect(rb.port)
        await client.send_frame(CLOSE, payload)
        assert await client.close_code() == code
        # The server closes the TCP connection first (RFC 6455 §7.1.1), without waiting for the client.
        with trio.fail_after(1):
            assert await client.stream.receive_some(65536) == b""
        await client.aclose()


# ------------------------------------------------------------------ handshake

def upgrade_request(method: str = "GET", version: str = "13") -> bytes:
    return (f"{method} /services HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n\r\n").encode()


def status_and_headers(response: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    head = response.partition(b"\r\n\r\n")[0].split(b"\r\n")
    return head[0], {name.lower(): value.strip() for name, _, value in (line.partition(b":") for line in head[1:])}


async def test_an_upgrade_that_is_not_a_get_is_refused_with_405():
    async with running_broker(ROUTES) as rb:
        for method in ("POST", "PUT"):
            status, headers = status_and_headers(await exchange(rb.port, upgrade_request(method)))
            assert status == b"HTTP/1.1 405 Method Not Allowed"
            assert headers[b"allow"] == b"GET"


async def test_a_websocket_version_other_than_13_gets_426_and_the_version_spoken():
    async with running_broker(ROUTES) as rb:
        status, headers = status_and_headers(await exchange(rb.port, upgrade_request(version="8")))
        assert status == b"HTTP/1.1 426 Upgrade Required"
        assert headers[b"sec-websocket-version"] == b"13"


async def test_http_responses_carry_their_reason_phrase():
    async with running_broker(ROUTES) as rb:
        get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        assert status_and_headers(await exchange(rb.port, get))[0] == b"HTTP/1.1 200 OK"
        nope = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        assert status_and_headers(await exchange(rb.port, nope))[0] == b"HTTP/1.1 400 Bad Request"


# Just over the limit (it may arrive in one read), and far over it (h11 refuses it before the end).
@pytest.mark.parametrize("size", [MAX_REQUEST_HEAD, 200_000])
async def test_request_headers_over_the_limit_get_431(size):
    async with running_broker(ROUTES) as rb:
        request = f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * size}\r\n\r\n".encode()
        response = await exchange(rb.port, request)
        assert status_and_headers(response)[0] == b"HTTP/1.1 431 Request Header Fields Too Large"
        assert str(MAX_REQUEST_HEAD) in json.loads(response.partition(b"\r\n\r\n")[2])["error"]


# ------------------------------------------------------------------ lingering close

async def test_a_client_still_sending_an_oversized_frame_reads_the_1009_close():
    async with running_broker(ROUTES, limits=Limits(max_frame_bytes=10_000)) as rb:
        client = await RawClient.connect(rb.port)
        # Far more than the socket buffers hold: the broker refuses the frame
        # from its header and must go on reading until the client is done.
        data = client_frame(TEXT, b"x" * 4_000_000)
        with trio.fail_after(10):
            for i in range(0, len(data), 16384):
                await client.stream.send_all(data[i:i + 16384])
        assert await client.close_code() == 1009
        await client.aclose()
