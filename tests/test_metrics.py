"""GET /metrics against a running broker: counts follow real traffic."""

import re
import urllib.request

import trio

from exocom.server.listener import Limits
from wire import running_broker

ROUTES = {
    "web": {"sends": ["ping", "lonely"], "receives": ["pong"]},
    "users": {"receives": ["ping"], "sends": ["pong"]},
    "users-2-deployment": {"deploys": "users@2.0.0"},
}


async def scrape(port: int) -> dict[str, float]:
    def get():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
            return response.read().decode()

    text = await trio.to_thread.run_sync(get)
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def test_metrics_follow_traffic(tmp_path):
    async with running_broker(ROUTES, tmp_path, limits=Limits(max_frame_bytes=1000)) as broker:
        async with broker.service("web") as web, broker.service("users", "1.0.0") as users:
            for _ in range(3):
                await web.send("ping")
                await users.receive()
            await web.send("lonely")
            await web.send_raw("not json")
            await web.send("pong")  # not in web's sends
            async with broker.service("users", "2.0.0"):
                m = await scrape(broker.port)
            assert m["exocom_messages_routed_total"] == 4
            assert m['exocom_deliveries_total{role="users",version="1.0.0"}'] == 3
            assert m['exocom_messages_undeliverable_total{name="lonely"}'] == 1
            assert m['exocom_messages_refused_total{reason="not_json"}'] == 1
            assert m['exocom_messages_refused_total{reason="not_allowed"}'] == 1
            assert m['exocom_connections{role="users",version="2.0.0"}'] == 1
            assert m['exocom_deployment_state{role="users",version="2.0.0",state="held"}'] == 1
            assert m['exocom_deployment_state{role="users",version="2.0.0",state="live"}'] == 0
            assert m['exocom_routing_seconds_count'] >= 6
            assert m['exocom_routing_seconds_bucket{le="+Inf"}'] == m['exocom_routing_seconds_count']
        async with broker.service("web", register=False) as stranger:
            await stranger.register()
            await stranger.send_raw("x" * 2000)
            assert (await stranger.closed_with())[0] == 1009
        m = await scrape(broker.port)
        assert m["exocom_frames_too_large_total"] == 1
        assert not any(re.match(r"exocom_connections\{", k) for k in m)
