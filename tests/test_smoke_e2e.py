from wire import running_broker

ROUTES = {
    "web": {"sends": ["users create"], "receives": ["users created"]},
    "users": {"receives": ["mongo create"], "sends": ["mongo created"],
              "translations": [{"public": "users create", "internal": "mongo create"},
                               {"public": "users created", "internal": "mongo created"}]},
}


async def test_translation_both_ways():
    async with running_broker(ROUTES) as broker:
        async with broker.service("web") as web, broker.service("users") as users:
            sent = await web.send("users create", {"name": "Jean"})
            got = await users.receive()
            assert got["name"] == "mongo create"
            assert got["payload"] == {"name": "Jean"}
            assert got["id"] == sent["id"] and got["activityId"] == sent["activityId"]
            assert got["sender"] == "" and got["timestamp"]
            await users.send("mongo created", {"id": 1}, activityId=sent["activityId"])
            reply = await web.receive()
            assert reply["name"] == "users created"
            assert reply["responseTime"] > 0
