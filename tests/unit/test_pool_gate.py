"""The ingress's gate: Standard requests run in all of a pool's slots unless Priority is offered."""

from __future__ import annotations

import asyncio

import pytest

from cluster.config import EmberConfig
from deployments.errors import ApiError
from deployments.pool_gate import PoolGate


def _gate(priority: bool) -> PoolGate:
    model = {"id": "accounts/t/models/m", "num_replicas": 1, "engine": {"kind": "sim", "max_num_seqs": 8}}
    if priority:
        model["pricing"] = {"priority": {"input": 0.4, "output": 0.4}}
    cfg = EmberConfig.model_validate({"models": [model], "ingress": {"priority_reserve": 0.25,
                                                                     "max_queue_wait_s": 0.2}})
    return PoolGate(cfg.models[0], cfg)


async def _fill(gate: PoolGate, n: int) -> list[asyncio.Task]:
    tasks = [asyncio.create_task(gate.acquire("standard", "m")) for _ in range(n)]
    await _turns()
    return tasks


def test_without_priority_standard_uses_every_slot():
    async def scenario():
        gate = _gate(priority=False)
        tasks = await _fill(gate, 8)
        assert all(t.done() and t.exception() is None for t in tasks)
        assert gate.in_flight == 8

    asyncio.run(scenario())


def test_with_priority_standard_leaves_the_reserve_and_priority_gets_it():
    async def scenario():
        gate = _gate(priority=True)
        tasks = await _fill(gate, 8)
        assert sum(t.done() for t in tasks) == 6  # floor(8 * 0.75); two wait for a slot
        await gate.acquire("priority", "m")  # straight into the reserve
        assert gate.in_flight == 7
        gate.release("priority")  # a slot frees, but Standard's share is still full (6 of 6)
        await _turns()
        assert sum(t.done() for t in tasks) == 6
        gate.release()  # one Standard request ends: the first waiter takes its slot
        await _turns()
        assert sum(t.done() for t in tasks) == 7
        with pytest.raises(ApiError) as err:  # the last one waits past the shedding bound
            await asyncio.wait_for(tasks[-1], 2)
        assert err.value.status == 503

    asyncio.run(scenario())


def test_standard_leaves_room_for_prioritys_recent_peak():
    async def scenario():
        gate = _gate(priority=True)  # 8 slots, configured reserve 0.25: Standard may use 6
        for _ in range(4):
            await gate.acquire("priority", "m")
        for _ in range(4):
            gate.release("priority")
        tasks = await _fill(gate, 8)  # Priority ran 4 at once lately: 5 stay free for it
        assert sum(t.done() and t.exception() is None for t in tasks) == 3
        assert gate.in_flight == 3
        await gate.acquire("priority", "m")  # and a Priority request still starts at once
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())


def _one_slot_gate() -> PoolGate:
    model = {"id": "accounts/t/models/m", "num_replicas": 1, "engine": {"kind": "sim", "max_num_seqs": 1},
             "pricing": {"priority": {"input": 0.4, "output": 0.4}}}
    cfg = EmberConfig.model_validate({"models": [model], "ingress": {"priority_reserve": 0.0,
                                                                     "max_queue_wait_s": 30}})
    return PoolGate(cfg.models[0], cfg)


def test_a_waiter_cancelled_after_it_was_handed_a_slot_passes_it_on():
    async def scenario():
        gate = _one_slot_gate()
        await gate.acquire("standard", "m")
        b = asyncio.create_task(gate.acquire("standard", "m"))
        c = asyncio.create_task(gate.acquire("standard", "m"))
        await asyncio.sleep(0)
        assert gate.waiting() == 2
        gate.release()  # the slot goes to b...
        b.cancel()  # ...which leaves before it runs again
        await asyncio.sleep(0)
        await asyncio.wait_for(c, 1)  # c gets it at once, not after a timeout
        assert b.cancelled()
        assert gate.in_flight == 1 and gate.waiting() == 0
        gate.release()
        assert gate.in_flight == 0

    asyncio.run(scenario())


def test_cancelled_waiters_never_leak_slots():
    async def scenario():
        gate = _one_slot_gate()
        await gate.acquire("standard", "m")
        waiters = [asyncio.create_task(gate.acquire("standard", "m")) for _ in range(20)]
        await asyncio.sleep(0)
        for i, w in enumerate(waiters):
            if i % 2:
                w.cancel()
        gate.release()
        for w in waiters:
            if not w.cancelled():
                await asyncio.wait_for(w, 1)
                gate.release()
        await asyncio.sleep(0)
        assert gate.in_flight == 0 and gate.waiting() == 0

    asyncio.run(scenario())


def test_priority_goes_ahead_of_waiting_standard():
    async def scenario():
        gate = _one_slot_gate()
        await gate.acquire("standard", "m")
        std = asyncio.create_task(gate.acquire("standard", "m"))
        await asyncio.sleep(0)
        pri = asyncio.create_task(gate.acquire("priority", "m"))
        await asyncio.sleep(0)
        gate.release()
        await asyncio.wait_for(pri, 1)
        assert not std.done()
        gate.release()
        await asyncio.wait_for(std, 1)
        assert gate.in_flight == 1

    asyncio.run(scenario())


async def _turns() -> None:
    """Let woken waiters run (a handed-over slot resumes its task a few loop turns later)."""
    for _ in range(5):
        await asyncio.sleep(0)


def _fair_gate(order: str = "vtc", seqs: int = 1, headroom: float = 0.0) -> PoolGate:
    model = {"id": "accounts/t/models/m", "num_replicas": 1,
             "engine": {"kind": "sim", "max_num_seqs": seqs, "fair_share_headroom": headroom}}
    cfg = EmberConfig.model_validate({"models": [model], "ingress": {"max_queue_wait_s": 30,
                                                                     "queue_order": order}})
    return PoolGate(cfg.models[0], cfg)


async def _queue_up(gate: PoolGate, account: str, n: int, tokens: tuple[int, int] = (10, 20)) -> list[asyncio.Task]:
    tasks = [asyncio.create_task(gate.acquire("standard", "m", account, *tokens)) for _ in range(n)]
    await _turns()
    return tasks


def test_a_quiet_account_goes_ahead_of_a_noisy_accounts_backlog():
    async def scenario():
        gate = _fair_gate()
        await gate.acquire("standard", "m", "noisy", 10, 20)
        noisy = await _queue_up(gate, "noisy", 5)
        quiet = await _queue_up(gate, "quiet", 1)
        gate.release()  # quiet joined level with noisy and was served less recently: it goes first
        await _turns()
        assert quiet[0].done() and not any(t.done() for t in noisy)
        for _ in range(5):
            gate.release()
            await _turns()
        assert all(t.done() for t in noisy) and gate.waiting() == 0

    asyncio.run(scenario())


def test_fcfs_order_serves_the_noisy_backlog_first():
    async def scenario():
        gate = _fair_gate("fcfs")
        await gate.acquire("standard", "m", "noisy", 10, 20)
        noisy = await _queue_up(gate, "noisy", 5)
        quiet = await _queue_up(gate, "quiet", 1)
        for _ in range(5):
            gate.release()
            await _turns()
        assert all(t.done() for t in noisy) and not quiet[0].done()

    asyncio.run(scenario())


@pytest.mark.parametrize("corrected", [True, False])
def test_an_overestimated_request_is_corrected_at_settle(corrected):
    async def scenario():
        gate = _fair_gate()
        charged = await gate.acquire("standard", "m", "a", 10, 1000)  # max_tokens 1000: charged 2010
        b = await _queue_up(gate, "b", 2, (10, 20))
        a = await _queue_up(gate, "a", 1, (10, 20))
        if corrected:
            gate.correct("standard", "a", charged, 10, 1)  # it generated one token: a falls to 12
        gate.release()  # b (counter 0) goes first either way
        await _turns()
        gate.release()  # then a, once corrected; uncorrected, b's second request
        await _turns()
        assert b[0].done()
        assert a[0].done() is corrected and b[1].done() is not corrected

    asyncio.run(scenario())


def test_waiters_of_many_accounts_given_up_at_random_never_leak_slots():
    async def scenario():
        gate = _fair_gate()
        await gate.acquire("standard", "m", "x", 1, 1)
        waiters = [asyncio.create_task(gate.acquire("standard", "m", f"acct{i % 3}", 1 + i, 1))
                   for i in range(30)]
        await _turns()
        for i, w in enumerate(waiters):
            if i % 4 in (1, 2):
                w.cancel()
        gate.release()  # possibly to a waiter that is being cancelled: it passes the slot on
        await _turns()
        left = {w for w in waiters if not w.cancelled()}
        assert len(left) == 15
        while left:  # whoever was handed the slot finishes and hands it on, in the gate's order
            done, left = await asyncio.wait(left, timeout=1, return_when=asyncio.FIRST_COMPLETED)
            assert len(done) == 1 and next(iter(done)).exception() is None
            gate.release()
        await _turns()
        assert gate.in_flight == 0 and gate.waiting() == 0

    asyncio.run(scenario())


def test_the_interactive_signal_counts_interactive_slots_not_batch_ones():
    async def scenario():
        gate = _gate(priority=False)
        assert gate.interactive_signal()["interactive"] == 0 and gate.interactive_signal()["idle_s"] > 1e6
        await gate.acquire("batch", "m")
        await gate.acquire("standard", "m")
        sig = gate.interactive_signal()
        assert sig["interactive"] == 1 and sig["idle_s"] == 0.0 and gate.in_flight == 2
        gate.release("standard")
        sig = gate.interactive_signal()
        assert sig["interactive"] == 0 and 0.0 <= sig["idle_s"] < 60
        gate.release("batch")
        assert gate.interactive_signal()["interactive"] == 0 and gate.in_flight == 0

    asyncio.run(scenario())


def test_an_interactive_request_takes_a_slot_back_from_the_batch_line_that_started_last():
    async def scenario():
        gate = _gate(priority=False)  # 8 slots, batch may use them all (no headroom by default)
        stopped: list[int] = []

        def preemptor(i: int):
            def preempt() -> bool:
                stopped.append(i)
                gate.release("batch", holder=i)  # the line's task ends and gives its slot back
                return True
            return preempt

        for i in range(8):
            await gate.acquire("batch", "m")
            gate.hold_batch(i, preemptor(i))
        assert gate.in_flight == 8
        await asyncio.wait_for(gate.acquire("standard", "m"), 1)  # not shed, not left waiting
        assert stopped == [7] and gate.in_flight == 8 and gate.interactive_signal()["interactive"] == 1
        gate.release("batch", holder=6)  # a line that ends by itself is no longer preemptible
        await gate.acquire("standard", "m")  # the free slot: nobody is stopped
        assert stopped == [7]
        await asyncio.wait_for(gate.acquire("standard", "m"), 1)
        assert stopped == [7, 5] and gate.state()["batch_preempted"] == 2

    asyncio.run(scenario())


def test_a_quiet_account_runs_in_the_headroom_while_a_noisy_one_holds_every_slot():
    async def scenario():
        gate = _fair_gate(seqs=8, headroom=0.125)  # 8 slots, and 1 more for accounts under a share
        assert gate.headroom == 1
        noisy = await _queue_up(gate, "noisy", 11)
        assert sum(t.done() for t in noisy) == 8 and gate.in_flight == 8
        quiet = await _queue_up(gate, "quiet", 1)  # holds none of 8 slots among 2 accounts: at once
        assert quiet[0].done() and gate.in_flight == 9
        other = await _queue_up(gate, "other", 1)  # the headroom is taken: it waits, first in line
        assert not other[0].done()
        gate.release(account="noisy")  # 8 in flight, all slots taken: the headroom is free again
        await _turns()
        assert other[0].done() and gate.in_flight == 9 and sum(t.done() for t in noisy) == 8
        gate.release(account="noisy")  # the noisy backlog gets nothing until a slot is really free
        await _turns()
        assert sum(t.done() for t in noisy) == 8 and gate.in_flight == 8
        gate.release(account="quiet")
        await _turns()
        assert sum(t.done() for t in noisy) == 9 and gate.in_flight == 8

    asyncio.run(scenario())


def test_an_account_alone_or_over_its_share_never_runs_in_the_headroom():
    async def scenario():
        gate = _fair_gate(seqs=8, headroom=0.125)
        alone = await _queue_up(gate, "a", 10)
        assert sum(t.done() for t in alone) == 8 and gate.in_flight == 8  # alone: its share is all 8
        b = await _queue_up(gate, "b", 2)  # b holds none: one runs in the headroom, one waits
        assert [t.done() for t in b] == [True, False] and gate.in_flight == 9
        for t in alone + b:
            t.cancel()
        await asyncio.gather(*alone, *b, return_exceptions=True)

    asyncio.run(scenario())


@pytest.mark.parametrize("order", ["fcfs", "vtc"])
def test_fcfs_or_no_headroom_keeps_the_pool_at_its_slots(order):
    async def scenario():
        gate = _fair_gate(order, seqs=8, headroom=0.125 if order == "fcfs" else 0.0)
        noisy = await _queue_up(gate, "noisy", 9)
        quiet = await _queue_up(gate, "quiet", 1)
        assert gate.headroom == 0 and gate.in_flight == 8 and not quiet[0].done()
        for t in noisy + quiet:
            t.cancel()
        await asyncio.gather(*noisy, *quiet, return_exceptions=True)

    asyncio.run(scenario())


def test_the_headroom_goes_to_a_quiet_waiter_even_when_fair_order_puts_the_noisy_backlog_first():
    async def scenario():
        gate = _fair_gate(seqs=8, headroom=0.125)
        await gate.acquire("standard", "m", "quiet", 10, 5000)  # a big estimate: quiet's counter is high
        noisy = await _queue_up(gate, "noisy", 10)
        assert sum(t.done() for t in noisy) == 7 and gate.in_flight == 8
        await gate.acquire("standard", "m", "x", 10, 20)  # into the headroom
        quiet = await _queue_up(gate, "quiet", 1)  # the headroom is taken: it waits, behind noisy in VTC order
        assert not quiet[0].done() and gate.in_flight == 9
        gate.release(account="noisy")
        await _turns()
        assert quiet[0].done() and sum(t.done() for t in noisy) == 7 and gate.in_flight == 9
        for t in noisy:
            t.cancel()
        await asyncio.gather(*noisy, return_exceptions=True)

    asyncio.run(scenario())


def test_batch_lines_never_run_in_the_headroom():
    async def scenario():
        gate = _fair_gate(seqs=8, headroom=0.125)
        noisy = await _queue_up(gate, "noisy", 8)
        with pytest.raises(ApiError) as err:  # a full pool refuses a batch line; the runner retries it
            await gate.acquire("batch", "m", "b", 10, 20)
        assert err.value.status == 503 and gate.in_flight == 8
        await gate.acquire("standard", "m", "b", 10, 20)  # the same account's interactive request does
        assert gate.in_flight == 9
        for t in noisy:
            t.cancel()
        await asyncio.gather(*noisy, return_exceptions=True)

    asyncio.run(scenario())


async def _backlog_beside_light_accounts(headroom: float, every: int) -> int:
    """8 slots; a backlogged account with 30 requests; the oldest request ends 40 times, and a
    new light account sends one request after every ``every``-th end. Returns how many of the
    backlogged account's requests got a slot."""
    gate = _fair_gate(seqs=8, headroom=headroom)
    noisy = await _queue_up(gate, "noisy", 30)
    holders = [("noisy", t) for t in noisy if t.done()]  # oldest first
    seen = {t for _, t in holders}
    light: list[asyncio.Task] = []
    for i in range(40):
        account, _ = holders.pop(0)
        gate.release(account=account)
        if i % every == 0:
            light.append(asyncio.create_task(gate.acquire("standard", "m", f"light{i}", 10, 20)))
        await _turns()
        for account, tasks in [("noisy", noisy), *((f"light{j}", [t]) for j, t in enumerate(light))]:
            for t in tasks:
                if t.done() and t not in seen:
                    seen.add(t)
                    holders.append((account, t))
        assert gate.in_flight == len(holders) <= gate.slots + gate.headroom
    served = sum(t.done() for t in noisy)
    for t in noisy + light:
        t.cancel()
    await asyncio.gather(*noisy, *light, return_exceptions=True)
    return served


@pytest.mark.parametrize("every", [1, 2, 3])
def test_the_headroom_never_serves_a_backlogged_account_less_than_fair_order_alone(every):
    # Light accounts of one request each are level with one another: they may use the headroom
    # only while the backlogged account holds more than one slot, so they cannot push it below
    # what VTC order alone gives it (with a new account at every end, VTC's tie-break already
    # gives each newcomer the slot first).
    plain = asyncio.run(_backlog_beside_light_accounts(0.0, every))
    with_headroom = asyncio.run(_backlog_beside_light_accounts(0.25, every))
    assert with_headroom >= plain, (with_headroom, plain)


def test_standard_in_the_headroom_leaves_prioritys_reserve_whole():
    async def scenario():
        model = {"id": "accounts/t/models/m", "num_replicas": 1, "pricing": {"priority": {"input": 0.4, "output": 0.4}},
                 "engine": {"kind": "sim", "max_num_seqs": 8, "fair_share_headroom": 0.25}}
        cfg = EmberConfig.model_validate({"models": [model], "ingress": {"priority_reserve": 0.25,
                                                                         "max_queue_wait_s": 30}})
        gate = PoolGate(cfg.models[0], cfg)  # Standard runs in 6 of 8 slots; 2 more in the headroom
        noisy = await _queue_up(gate, "noisy", 8)
        assert sum(t.done() for t in noisy) == 6
        await gate.acquire("standard", "m", "q1", 10, 20)
        await gate.acquire("standard", "m", "q2", 10, 20)
        assert gate.in_flight == 8  # two quiet Standard requests in the headroom
        for _ in range(2):  # Priority still finds its 2 reserved slots, even for the noisy account
            await asyncio.wait_for(gate.acquire("priority", "m", "noisy", 10, 20), 1)
        assert gate.in_flight == 10
        late = asyncio.create_task(gate.acquire("priority", "m", "noisy", 10, 20))
        await _turns()
        assert not late.done()  # the engines are full: slots, reserve and headroom
        for t in [*noisy, late]:
            t.cancel()
        await asyncio.gather(*noisy, late, return_exceptions=True)

    asyncio.run(scenario())
