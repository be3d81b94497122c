"""HTTP details of the one port: HEAD requests, the status page's headers,
and frames that a client sends in the same write as its upgrade request."""

import json
import re

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.frame_protocol import FrameProtocol

import auth_mode
from wire import running_broker

ROUTES = {"web": {"sends": ["ping"]}, "users": {"receives": ["ping"]}}


async def exchange(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        out = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                out += chunk
    return out


async def test_head_answers_like_get_without_a_body():
    async with running_broker(ROUTES) as broker:
        for path in ("/", "/healthz", "/config.json", "/metrics", "/nope"):
            get = await exchange(broker.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = await exchange(broker.port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            get_head, _, get_body = get.partition(b"\r\n\r\n")
            head_head, _, head_body = head.partition(b"\r\n\r\n")
            assert head_head.split(b"\r\n")[0] == get_head.split(b"\r\n")[0]  # the same status line
            assert b"content-length" in head_head.lower() and head_body == b"" and get_body


async def test_the_status_page_is_html_never_cached_and_needs_nothing_from_elsewhere():
    async with running_broker(ROUTES) as broker:
        response = await exchange(broker.port, b"GET /?refresh=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().lower().split("\r\n")
    assert lines[0] == "http/1.1 200 ok"
    assert {"content-type: text/html; charset=utf-8", "cache-control: no-store", f"content-length: {len(body)}"} \
        <= set(lines)
    page = body.decode()
    assert page.startswith("<!doctype html>")
    # Operators' networks may be closed: no script, style or font from elsewhere.
    assert not re.search(r"(src|href)\s*=|@import|url\(|https?://", page), "the page loads something from elsewhere"
    assert ".innerHTML" not in page, "server-supplied strings enter the page as text only"


async def test_frames_sent_with_the_upgrade_request_are_not_lost():
    async with running_broker(ROUTES) as broker:
        async with broker.service("users") as users:
            ws = WSConnection(ConnectionType.CLIENT)
            frames = FrameProtocol(client=True, extensions=[])  # wsproto's client would wait for the 101
            data = ws.send(Request(host="x", target="/services", extra_headers=auth_mode.HEADERS))
            data += frames.send_data(json.dumps({"name": "exocom.register-service", "sender": "web", "id": "r"}))
            data += frames.send_data(json.dumps({"name": "ping", "sender": "web", "id": "p1", "activityId": "a"}))
            stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
            async with stream:
                await stream.send_all(data)  # one write: request, registration and a message
                got = await users.receive()
                assert got["id"] == "p1"
                ws.receive_data(await stream.receive_some(65536))
                assert any(isinstance(e, AcceptConnection) for e in ws.events())
