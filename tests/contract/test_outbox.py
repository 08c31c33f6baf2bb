"""The usage outbox and Billing's delivery through it, against real SQLite files and real Redis.

Process death is a real SIGKILL of a child process: nothing in it gets to clean up.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from cluster.config import ModelConfig, StoreConfig
from cluster.stores import RedisLedgerStore, Stores
from deployments.billing import Billing, outbox_path
from deployments.outbox import Outbox
from tests.conftest import REPO_ROOT, free_port

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
MODEL = ModelConfig(id="accounts/test/models/outbox")




def _event(i: int, account: str = "acct-o") -> dict:
    return {"request_id": f"req-{i:04d}-{uuid.uuid4().hex[:8]}", "account": account, "model": MODEL.id,
            "tier": "standard", "prompt_tokens": 10, "cached_tokens": 0, "completion_tokens": i,
            "cost_usd": 0.001, "day": "2026-05-09", "ts": 0.0}


def _run_child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, text=True)


async def _until(condition, timeout_s: float = 20.0) -> None:
    """Await ``condition()`` (an async predicate) becoming true, or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_put_pending_done(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    a, b = _event(1), _event(2)
    box.put(a)
    box.put(b)
    box.put(dict(a, completion_tokens=999))  # a repeat of a request id is a no-op
    assert box.count() == 2
    assert box.pending(10) == [a, b]
    assert box.pending(10) == []  # leased to the first caller
    box.release([b["request_id"]])
    assert box.pending(10) == [b]
    box.done([a["request_id"], b["request_id"]])
    assert box.count() == 0 and box.pending(10) == []


def test_put_survives_process_death(tmp_path):
    path = tmp_path / "o.sqlite"
    event = _event(7)
    child = _run_child(f"""
        import os, signal
        from deployments.outbox import Outbox
        Outbox({str(path)!r}).put({event!r})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert child.wait(60) == -9
    assert Outbox(path).pending(10) == [event]


def test_outbox_path_is_one_file_per_store(tmp_path):
    a = outbox_path(StoreConfig(url="redis://h:6379/0", outbox_dir=str(tmp_path)))
    b = outbox_path(StoreConfig(url="redis://h:6379/1", outbox_dir=str(tmp_path)))
    assert a.parent == tmp_path and b.parent == tmp_path and a != b
    assert a == outbox_path(StoreConfig(url="redis://h:6379/0", outbox_dir=str(tmp_path)))
    assert "ember-outbox" in str(outbox_path(StoreConfig(url="redis://h:6379/0")))
    assert str(outbox_path(StoreConfig(url="memory://"))) == ":memory:"


def test_concurrent_drainers_deliver_each_event_once(tmp_path, ledger_prefix):
    path, n = tmp_path / "o.sqlite", 300
    account = "acct-" + uuid.uuid4().hex
    writer = Outbox(path)
    for i in range(n):
        writer.put(_event(i, account))
    results: dict[str, list[bool]] = {}

    def drain(name: str) -> None:
        async def go():
            box, ledger = Outbox(path), RedisLedgerStore(REDIS_URL, prefix=ledger_prefix)
            answers = []
            while batch := box.pending(10):
                for event in batch:
                    answers.append(await ledger.record(event))
                box.done(e["request_id"] for e in batch)
            results[name] = answers

        asyncio.run(go())

    threads = [threading.Thread(target=drain, args=(f"d{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # Every record() said "new": the leases kept the two drainers off each other's events.
    assert sum(len(a) for a in results.values()) == n
    assert all(all(a) for a in results.values())
    assert writer.count() == 0

    async def totals():
        return await RedisLedgerStore(REDIS_URL, prefix=ledger_prefix).totals(account)

    [row] = asyncio.run(totals())
    assert row["requests"] == n and row["completion_tokens"] == sum(range(n))


def test_billing_killed_during_outage_loses_nothing(tmp_path, ledger_prefix):
    """Redis down, 50 requests billed, the ingress SIGKILLed; a new Billing on the same outbox
    file with a working store delivers all 50, once."""
    path, n = tmp_path / "outbox.sqlite", 50
    account = "acct-" + uuid.uuid4().hex
    dead_store = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    child = _run_child(f"""
        import asyncio
        from cluster.config import ModelConfig
        from cluster.stores import Stores
        from deployments.billing import Billing

        async def main():
            billing = Billing(Stores({dead_store!r}), 1, outbox_path={str(path)!r})
            billing.outbox.lease_s = 0.5  # a kill mid-delivery must not hold rows back for long
            model = ModelConfig(id={MODEL.id!r})
            for i in range({n}):
                billing.bill(f"req-{{i}}", {account!r}, model, "standard", 100, 20, i + 1)
            await billing.flush(timeout_s=5)  # fails: the store is down
            print(billing.backlog(), flush=True)
            await asyncio.Event().wait()

        asyncio.run(main())
    """)
    try:
        assert child.stdout.readline().strip() == str(n)
    finally:
        child.kill()
        child.wait(60)
    assert Outbox(path).count() == n

    async def recover():
        stores = Stores(REDIS_URL)
        stores.ledger = RedisLedgerStore(REDIS_URL, prefix=ledger_prefix)
        billing = Billing(stores, 1, outbox_path=path)
        billing.start()

        async def delivered() -> bool:
            await billing.flush(timeout_s=1)  # also picks up rows whose lease ran out
            return billing.backlog() == 0

        await _until(delivered)
        await billing.close()
        return await stores.ledger.totals(account), await stores.ledger.spend(account, "2026-05")

    [row], _ = asyncio.run(recover())
    assert row["requests"] == n
    assert row["prompt_tokens"] == 100 * n and row["cached_tokens"] == 20 * n
    assert row["completion_tokens"] == sum(range(1, n + 1))


def test_billing_delivers_and_flushes_through_the_outbox(tmp_path, ledger_prefix):
    account = "acct-" + uuid.uuid4().hex

    async def go():
        stores = Stores(REDIS_URL)
        stores.ledger = RedisLedgerStore(REDIS_URL, prefix=ledger_prefix)
        billing = Billing(stores, 1, outbox_path=tmp_path / "o.sqlite")
        events = [billing.bill(uuid.uuid4().hex, account, MODEL, "standard", 50, 10, 5) for _ in range(20)]
        await billing.flush(timeout_s=10)
        assert billing.backlog() == 0
        [row] = await stores.ledger.totals(account)
        assert row["requests"] == 20
        total, _ = await stores.ledger.spend(account, events[0]["day"][:7])
        assert total == pytest.approx(sum(e["cost_usd"] for e in events))
        await billing.close()

    asyncio.run(go())


def test_memory_store_billing_needs_no_file(tmp_path):
    async def go():
        stores = Stores("memory://")
        billing = Billing(stores, 1)
        assert str(billing.outbox.path) == ":memory:"
        billing.bill("r1", "acct-m", MODEL, "standard", 5, 0, 5)
        billing.bill("r1", "acct-m", MODEL, "standard", 5, 0, 5)  # the same request billed twice
        await billing.flush(timeout_s=10)
        [row] = await stores.ledger.totals("acct-m")
        assert row["requests"] == 1 and billing.backlog() == 0
        await billing.close()

    asyncio.run(go())

