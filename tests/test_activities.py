"""The broker's memory of activities and message ids stays within fixed
bounds over a long run, whatever the activity ids (issue 11, item 2).

bench/memory_curve.py measures the RSS of a real broker; these tests pin the
structure behind a flat curve: the number of entries held, counted, never
timed."""

from __future__ import annotations

from exocom.core.activities import Generations

from core import Harness

ROUTES = {"web": {"sends": ["ping"]}, "users": {"receives": ["ping"]}}
CAP = 50


def run(h: Harness, web: int, users: int, seconds: int, per_second: int, activity) -> list[tuple[int, int]]:
    """`per_second` pings a second for `seconds` simulated seconds; the
    entries held (activities, message ids) after each tick."""
    held = []
    n = 0
    for _ in range(seconds):
        for _ in range(per_second):
            n += 1
            aid = activity(n)
            h.frame(web, {"name": "ping", "id": f"m{n}", **({"activityId": aid} if aid else {})})
        assert len(h.take(users)) == per_second
        h.tick(1)
        held.append((len(h.broker.activities), len(h.broker.commands)))
    return held


def start() -> tuple[Harness, int, int]:
    h = Harness(ROUTES, activity_ttl=60, max_activities=CAP)
    return h, h.connect("web"), h.connect("users")


def test_a_fresh_activity_id_per_message_holds_at_most_twice_the_cap():
    h, web, users = start()
    held = run(h, web, users, seconds=200, per_second=30, activity=lambda n: f"a{n}")  # 6,000 fresh ids
    assert max(a for a, _ in held) <= 2 * CAP and max(c for _, c in held) <= 2 * CAP


def test_under_a_steady_load_the_entries_held_never_dip_below_the_cap():
    # The generations fill up every 2 s; the 60 s clock must not also drop a
    # young generation half full (a dip of RSS once a minute).
    h, web, users = start()
    held = run(h, web, users, seconds=200, per_second=27, activity=lambda n: f"a{n}")
    assert min(a for a, _ in held[5:]) >= CAP and min(c for _, c in held[5:]) >= CAP


def test_reused_activity_ids_hold_one_entry_each():
    h, web, users = start()
    held = run(h, web, users, seconds=200, per_second=30, activity=lambda n: f"a{n % 20}")
    assert max(a for a, _ in held) == 20 and max(c for _, c in held) <= 2 * CAP


def test_messages_without_an_activity_hold_no_activity():
    h, web, users = start()
    held = run(h, web, users, seconds=200, per_second=30, activity=lambda n: None)
    assert max(a for a, _ in held) == 0 and max(c for _, c in held) <= 2 * CAP


def test_the_clock_rotates_generations_that_do_not_fill_up():
    g = Generations(ttl=60, now=0, max_entries=CAP)
    g.put("a", 1)
    g.rotate_if_due(59)
    assert g.get("a") == 1
    g.rotate_if_due(60)
    g.rotate_if_due(120)  # "a" was last used before the rotation at 60: forgotten at 120
    assert g.get("a") is None and len(g) == 0


def test_a_generation_that_filled_up_starts_the_next_period():
    g = Generations(ttl=60, now=0, max_entries=CAP)
    for i in range(CAP):
        g.put(i, i)  # full: rotated by size
    g.rotate_if_due(59)  # the next tick: the period restarts at 59
    g.put("young", 1)
    g.rotate_if_due(60)  # 60 s after the start, but only 1 s after the rotation by size
    assert len(g) == CAP + 1
    g.rotate_if_due(119)
    assert g.get("young") == 1 and len(g) == 1  # the full generation, last used before 59, is gone
