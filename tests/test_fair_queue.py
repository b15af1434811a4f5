"""The slot wait queue: principals take turns, each one's calls keep their order."""

from __future__ import annotations

import asyncio

import pytest

from edge_service.fair_queue import FairWaitQueue, QueueFull, QueueTimeout


class Slots:
    """N slots; acquire gives one or None."""

    def __init__(self, n: int) -> None:
        self.free = n

    def take(self):
        if self.free > 0:
            self.free -= 1
            return "slot"
        return None


def run(coro):
    return asyncio.run(coro)


def test_a_free_slot_is_taken_at_once():
    async def main():
        q, slots = FairWaitQueue(), Slots(1)
        got, waited = await q.acquire("a", slots.take, 1.0)
        return got, waited, q.depth

    assert run(main()) == ("slot", 0.0, 0)


def test_principals_take_turns_and_each_keeps_its_order():
    async def main():
        q, slots = FairWaitQueue(), Slots(0)
        served: list[str] = []

        async def call(principal: str, n: int):
            await q.acquire(principal, slots.take, 30.0)
            served.append(f"{principal}{n}")

        tasks = [asyncio.create_task(call("a", i)) for i in range(4)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(call("b", i)) for i in range(2)]
        await asyncio.sleep(0)
        assert q.depth == 6 and q.depth_of("a") == 4
        for _ in range(6):  # free one slot at a time
            slots.free += 1
            q.notify()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        return served

    served = run(main())
    # b's first call does not wait for all of a's: they alternate while both wait.
    assert served == ["a0", "b0", "a1", "b1", "a2", "a3"]


def test_timeout_says_how_long_to_wait():
    async def main():
        q, slots = FairWaitQueue(), Slots(0)
        q.record_hold(2.0)
        with pytest.raises(QueueTimeout) as err:
            await q.acquire("a", slots.take, 0.05)
        return err.value, q.depth

    exc, depth = run(main())
    assert depth == 0  # the timed-out call left the queue
    assert exc.expected_wait_s == pytest.approx(2.0)
    assert "expected wait about 2.0 s" in str(exc)


def test_a_cancelled_waiter_leaves_and_its_wakeup_goes_to_the_next():
    async def main():
        q, slots = FairWaitQueue(), Slots(0)
        first = asyncio.create_task(q.acquire("a", slots.take, 30.0))
        second = asyncio.create_task(q.acquire("b", slots.take, 30.0))
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.sleep(0)
        slots.free = 1
        q.notify()
        got, _ = await asyncio.wait_for(second, 5)
        return got, q.depth

    assert run(main()) == ("slot", 0)


def test_a_full_queue_refuses():
    async def main():
        q, slots = FairWaitQueue(max_waiting=1), Slots(0)
        t = asyncio.create_task(q.acquire("a", slots.take, 30.0))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await q.acquire("b", slots.take, 30.0)
        t.cancel()

    run(main())


def test_stats_report_depth_and_recent_wait():
    async def main():
        q, slots = FairWaitQueue(), Slots(0)
        t = asyncio.create_task(q.acquire("a", slots.take, 30.0))
        await asyncio.sleep(0.02)
        s1 = q.stats()
        slots.free = 1
        q.notify()
        await t
        return s1, q.stats()

    before, after = run(main())
    assert before.depth == 1 and after.depth == 0
    assert after.recent_wait_s > 0


def test_a_woken_call_refused_for_another_reason_passes_the_slot_on():
    async def main():
        q, slots = FairWaitQueue(), Slots(0)

        def refuse():
            if slots.free:
                raise LookupError("its session is gone")
            return None

        first = asyncio.create_task(q.acquire("a", refuse, 30.0))
        second = asyncio.create_task(q.acquire("b", slots.take, 30.0))
        await asyncio.sleep(0)
        slots.free = 1
        q.notify()  # wakes a, which is refused: b must get the slot
        with pytest.raises(LookupError):
            await first
        got, _ = await asyncio.wait_for(second, 5)
        return got, q.depth

    assert run(main()) == ("slot", 0)


def test_expected_wait_counts_rounds_of_parallel_slots():
    async def main():
        q, slots = FairWaitQueue(parallel=2), Slots(0)
        q.record_hold(3.0)
        waiting = [asyncio.create_task(q.acquire(p, slots.take, 30.0)) for p in "abc"]
        await asyncio.sleep(0)
        estimate = q.expected_wait_s()  # 3 ahead and itself, 2 at a time: 2 rounds
        for t in waiting:
            t.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        return estimate, q.depth

    assert run(main()) == (pytest.approx(6.0), 0)


def test_a_principal_over_its_share_is_skipped_and_does_not_block_others():
    async def main():
        q, slots = FairWaitQueue(), Slots(0)
        over = {"a"}  # a holds its share of the slots
        eligible = lambda p: p not in over  # noqa: E731
        a = asyncio.create_task(q.acquire("a", slots.take, 30.0, eligible=eligible))
        await asyncio.sleep(0)
        slots.free = 1
        # b arrives with a slot free: a's waiting call does not stand in its way.
        got, waited = await q.acquire("b", slots.take, 30.0, eligible=eligible)
        assert (got, waited) == ("slot", 0.0) and not a.done()
        slots.free = 1
        q.notify()  # a is still over its share: nobody is woken
        await asyncio.sleep(0.01)
        assert not a.done()
        over.clear()
        q.notify()
        return await asyncio.wait_for(a, 5)

    got, _ = run(main())
    assert got == "slot"


def _serve_all(q: FairWaitQueue, slots: Slots, served: list[str], n: int):
    """Free one slot at a time, ``n`` times, letting each woken call run."""
    async def go():
        for _ in range(n):
            slots.free += 1
            q.notify()
            await asyncio.sleep(0.01)
    return go()


def test_the_principal_that_used_less_slot_time_goes_first():
    """Round-robin per call would alternate a and b; a has held slots for 30 s
    more than b, so b's waiting calls go first until b catches up."""
    async def main():
        q, slots = FairWaitQueue(), Slots(0)
        served: list[str] = []

        async def call(principal: str, n: int):
            await q.acquire(principal, slots.take, 30.0)
            served.append(f"{principal}{n}")
            q.charge(principal, 10.0)  # each call holds its slot 10 s

        q.charge("a", 30.0)
        tasks = [asyncio.create_task(call("a", i)) for i in range(3)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(call("b", i)) for i in range(3)]
        await asyncio.sleep(0)
        await _serve_all(q, slots, served, 6)
        await asyncio.gather(*tasks)
        return served, q.service_of("a"), q.service_of("b")

    served, a, b = run(main())
    # b was lifted to a's 30 s when it started waiting (idle time is not
    # credit), so neither is ahead by more than one 10 s call at any point.
    for n in range(1, len(served) + 1):
        head = [s[0] for s in served[:n]]
        assert abs(head.count("a") - head.count("b")) <= 1, served
    assert (a, b) == (pytest.approx(60.0), pytest.approx(60.0))


def test_a_heavy_principal_waits_while_a_light_one_catches_up():
    async def main():
        q, slots = FairWaitQueue(), Slots(0)
        served: list[str] = []

        async def call(principal: str, n: int, hold: float):
            await q.acquire(principal, slots.take, 30.0)
            served.append(f"{principal}{n}")
            q.charge(principal, hold)

        tasks = [asyncio.create_task(call("b", i, 1.0)) for i in range(4)]  # b waits first...
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(call("a", i, 20.0)) for i in range(2)]  # ...then a, lifted to b's 0
        await asyncio.sleep(0)
        await _serve_all(q, slots, served, 6)
        await asyncio.gather(*tasks)
        return served

    served = run(main())
    # b0 (tie, b first in line), a0 (tie): a is now at 20 s, b at 1 s; b's
    # other three calls (1 s each) all go before a's second.
    assert served == ["b0", "a0", "b1", "b2", "b3", "a1"]


def test_idle_time_is_not_credit():
    """A principal that starts waiting is lifted to the least counter of those
    already waiting: it cannot bank slot time while away and then starve them."""
    async def main():
        q, slots = FairWaitQueue(), Slots(0)
        q.charge("busy", 100.0)
        waiting = asyncio.create_task(q.acquire("busy", slots.take, 30.0))
        await asyncio.sleep(0)
        newcomer = asyncio.create_task(q.acquire("new", slots.take, 30.0))
        await asyncio.sleep(0)
        lifted = q.service_of("new")
        for t in (waiting, newcomer):
            t.cancel()
        await asyncio.gather(waiting, newcomer, return_exceptions=True)
        return lifted

    assert run(main()) == pytest.approx(100.0)


def test_charges_ignore_nonsense_and_the_table_stays_bounded():
    from edge_service import fair_queue

    q = FairWaitQueue()
    for bad in (float("nan"), float("inf"), -1.0, 0.0):
        q.charge("a", bad)
    assert q.service_of("a") == 0.0
    for i in range(fair_queue._MAX_COUNTERS + 1):
        q.charge(f"p{i}", 1.0 + i)
    assert len(q._service) <= fair_queue._MAX_COUNTERS
    assert q.service_of(f"p{fair_queue._MAX_COUNTERS}") > 0  # the heaviest are kept
