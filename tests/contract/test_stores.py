"""One contract suite over every store implementation: in memory and real Redis."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from cluster.stores import (
    SEED_REVOKED,
    SEED_TAKEN,
    SEEDED,
    MemoryKeyStore,
    MemoryLedgerStore,
    MemoryLimitStore,
    RedisKeyStore,
    RedisLedgerStore,
    RedisLimitStore,
    StoreUnavailable,
    hash_key,
    key_id,
)

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(params=["memory", "redis"])
def kind(request):
    return request.param


def _run(coro):
    return asyncio.run(coro)


def _key_store(kind):
    return MemoryKeyStore() if kind == "memory" else RedisKeyStore(REDIS_URL)


def _limit_store(kind):
    return MemoryLimitStore() if kind == "memory" else RedisLimitStore(REDIS_URL)


def test_keys_are_found_by_hash_and_revocable(kind):
    async def go():
        store = _key_store(kind)
        key = "sk-" + uuid.uuid4().hex
        assert await store.account_for(hash_key(key)) is None
        await store.put(hash_key(key), "acct-1")
        assert await store.account_for(hash_key(key)) == "acct-1"
        assert await store.account_for(hash_key(key + "x")) is None
        await store.revoke(hash_key(key))
        assert await store.account_for(hash_key(key)) is None

    _run(go())


def test_hash_is_not_the_key():
    assert hash_key("sk-abc") != "sk-abc" and len(hash_key("sk-abc")) == 64


def test_limit_state_round_trips_and_never_goes_back_in_time(kind):
    async def go():
        store = _limit_store(kind)
        scope = "acct|model-" + uuid.uuid4().hex
        assert await store.load(scope) is None
        await store.save(scope, {"prompt": [1.0, 2.0, 3.0, 4.0]}, stamp=10.0)
        await store.save(scope, {"prompt": [9.0, 9.0, 9.0, 9.0]}, stamp=5.0)  # stale writer loses
        assert await store.load(scope) == {"prompt": [1.0, 2.0, 3.0, 4.0]}
        await store.save(scope, {"prompt": [5.0, 6.0, 7.0, 8.0]}, stamp=11.0)
        assert await store.load(scope) == {"prompt": [5.0, 6.0, 7.0, 8.0]}

    _run(go())


def test_unreachable_redis_raises_store_unavailable():
    async def go():
        store = RedisLimitStore("redis://127.0.0.1:1/0", timeout_s=0.2)
        with pytest.raises(StoreUnavailable):
            await store.load("x")
        with pytest.raises(StoreUnavailable):
            await store.save("x", {}, 1.0)

    _run(go())


# -- the usage ledger ---------------------------------------------------------------------------



def _ledger(kind, prefix, max_events=10_000):
    if kind == "memory":
        return MemoryLedgerStore(max_events=max_events)
    return RedisLedgerStore(REDIS_URL, max_events=max_events, prefix=prefix)


def usage_event(account, n=0, model="accounts/t/models/m", day="2026-05-09", cost=0.25):
    return {"request_id": uuid.uuid4().hex, "account": account, "model": model, "tier": "standard",
            "prompt_tokens": 10 + n, "cached_tokens": n % 3, "completion_tokens": 2 * n, "cost_usd": cost,
            "day": day, "ts": 0.0}


def test_ledger_records_a_request_id_once(kind, ledger_prefix):
    async def go():
        ledger = _ledger(kind, ledger_prefix)
        event = usage_event("acct-" + uuid.uuid4().hex, n=4)
        assert await ledger.record(event) is True
        assert await ledger.record(dict(event)) is False  # a retry whose answer was lost
        [row] = await ledger.totals(event["account"])
        assert (row["requests"], row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (1, 14, 1, 8)
        assert await ledger.spend(event["account"], "2026-05") == pytest.approx((0.25, 0.25))

    _run(go())


def test_ledger_says_which_request_ids_it_has_recorded(kind, ledger_prefix):
    async def go():
        ledger = _ledger(kind, ledger_prefix)
        events = [usage_event("acct-" + uuid.uuid4().hex, n=i) for i in range(3)]
        for e in events[:2]:
            await ledger.record(e)
        ids = [e["request_id"] for e in events]
        assert await ledger.recorded(ids) == set(ids[:2])
        assert await ledger.recorded([]) == set()

    _run(go())


def test_ledger_totals_and_spend_add_up(kind, ledger_prefix):
    async def go():
        ledger = _ledger(kind, ledger_prefix)
        acct, other = "acct-" + uuid.uuid4().hex, "acct-" + uuid.uuid4().hex
        events = [usage_event(acct, 1, day="2026-04-30", cost=0.5), usage_event(acct, 2, day="2026-05-01"),
                  usage_event(acct, 3, day="2026-05-01"), usage_event(acct, 4, model="accounts/t/models/x"),
                  usage_event(other, 5, cost=9.0)]
        for e in events:
            assert await ledger.record(e)
        rows = {(r["model"], r["day"]): r for r in await ledger.totals(acct)}
        assert set(rows) == {("accounts/t/models/m", "2026-04-30"), ("accounts/t/models/m", "2026-05-01"),
                             ("accounts/t/models/x", "2026-05-09")}
        may1 = rows[("accounts/t/models/m", "2026-05-01")]
        assert (may1["requests"], may1["prompt_tokens"], may1["cached_tokens"], may1["completion_tokens"]) == \
            (2, 25, 2, 10)
        assert may1["cost_usd"] == pytest.approx(0.5)
        assert await ledger.spend(acct, "2026-05") == pytest.approx((1.25, 0.75))
        assert await ledger.spend(acct, "2026-04") == pytest.approx((1.25, 0.5))
        assert await ledger.spend(other, "2026-05") == pytest.approx((9.0, 9.0))
        assert await ledger.spend("acct-nobody", "2026-05") == (0.0, 0.0)

    _run(go())


def test_ledger_trims_raw_events_but_keeps_totals_exact(kind, ledger_prefix):
    keep, n = 10, 300

    async def go():
        ledger = _ledger(kind, ledger_prefix, max_events=keep)
        acct = "acct-" + uuid.uuid4().hex
        events = [usage_event(acct, i, cost=0.125) for i in range(n)]
        for e in events:
            assert await ledger.record(e)
        [row] = await ledger.totals(acct)
        assert row["requests"] == n
        assert row["prompt_tokens"] == sum(e["prompt_tokens"] for e in events)
        assert row["completion_tokens"] == sum(e["completion_tokens"] for e in events)
        assert row["cost_usd"] == pytest.approx(0.125 * n)
        assert await ledger.spend(acct, "2026-05") == pytest.approx((0.125 * n, 0.125 * n))
        assert await ledger.record(events[-1]) is False  # still deduped after trimming
        return ledger, events

    ledger, events = _run(go())
    if kind == "memory":
        assert [e["request_id"] for e in ledger.events] == [e["request_id"] for e in events[-keep:]]
    else:
        import redis

        r = redis.Redis.from_url(REDIS_URL)
        # MAXLEN ~ trims whole stream nodes only, so up to one node's worth more may remain.
        node = int(r.config_get("stream-node-max-entries")["stream-node-max-entries"])
        assert keep <= r.xlen(ledger.stream) <= keep + node < n
        r.close()


def test_memory_ledger_dedupes_within_its_window_of_recent_ids():
    async def go():
        ledger = MemoryLedgerStore(dedupe_ids=5)
        events = [usage_event("acct-w", i) for i in range(8)]
        for e in events:
            assert await ledger.record(e)
        assert not await ledger.record(events[-1]) and not await ledger.record(events[3])
        assert await ledger.record(events[0])  # older than the window: documented, counted again

    _run(go())


# -- API keys and accounts ----------------------------------------------------------------------

@pytest.fixture
def key_space(kind):
    """Stores of one kind, a fresh account id and a key maker; on Redis, what the test wrote is
    removed afterwards."""
    from cluster.stores import Stores

    stores = Stores("memory://" if kind == "memory" else REDIS_URL)
    made: list[str] = []
    acct = "t-" + uuid.uuid4().hex[:12]

    def new_key() -> str:
        made.append(hash_key("ember-" + uuid.uuid4().hex))
        return made[-1]

    yield stores, acct, new_key
    if kind == "redis":
        import redis

        r = redis.Redis.from_url(REDIS_URL)
        doomed = [k for a in (acct, acct + "-other") for k in r.scan_iter(f"ember:acct:{a}*")]
        doomed += [f"ember:key:{h}" for h in made] + [f"ember:keyid:{key_id(h)}" for h in made]
        r.delete(*doomed)
        r.close()


def test_account_keys_are_indexed_listed_and_revoked_by_id(key_space):
    stores, acct, new_key = key_space

    async def go():
        h = new_key()
        assert await stores.accounts.create(acct, {"id": acct}) is True
        assert await stores.accounts.create(acct, {"id": acct}) is False
        await stores.accounts.add_key(acct, h)
        assert await stores.accounts.keys(acct) == [h] and await stores.accounts.seeded_keys(acct) == []
        assert await stores.keys.account_for(h) == acct
        assert await stores.accounts.revoke_key(key_id(h)) == acct
        assert await stores.keys.account_for(h) is None and await stores.accounts.keys(acct) == []
        assert await stores.accounts.revoke_key(key_id(h)) is None

    _run(go())


def test_seeding_creates_the_account_and_indexes_the_key_idempotently(key_space):
    stores, acct, new_key = key_space

    async def go():
        h = new_key()
        record = {"id": acct, "demo": True}
        assert await stores.accounts.seed(acct, h, record) == SEEDED
        assert await stores.accounts.seed(acct, h, record) == SEEDED
        assert await stores.accounts.get(acct) == record
        assert await stores.accounts.keys(acct) == [h] and await stores.accounts.seeded_keys(acct) == [h]
        assert await stores.keys.account_for(h) == acct
        assert await stores.accounts.create(acct, {"id": acct}) is False  # the id is taken

    _run(go())


def test_a_seeded_key_an_admin_revoked_is_not_seeded_again(key_space):
    stores, acct, new_key = key_space

    async def go():
        h, h2 = new_key(), new_key()
        await stores.accounts.seed(acct, h, {"id": acct})
        assert await stores.accounts.revoke_key(key_id(h)) == acct
        assert await stores.accounts.seed(acct, h, {"id": acct}) == SEED_REVOKED
        assert await stores.keys.account_for(h) is None and await stores.accounts.keys(acct) == []
        assert await stores.accounts.seed(acct, h2, {"id": acct}) == SEEDED  # a new key is fine

    _run(go())


def test_unseeding_removes_only_seeded_keys_and_does_not_tombstone(key_space):
    stores, acct, new_key = key_space

    async def go():
        seeded, admin_made = new_key(), new_key()
        await stores.accounts.seed(acct, seeded, {"id": acct})
        await stores.accounts.add_key(acct, admin_made)
        assert await stores.accounts.unseed(acct, keep=seeded) == []
        assert await stores.accounts.unseed(acct) == [seeded]
        assert await stores.keys.account_for(seeded) is None
        assert await stores.keys.account_for(admin_made) == acct
        assert await stores.accounts.keys(acct) == [admin_made] and await stores.accounts.seeded_keys(acct) == []
        assert await stores.accounts.revoke_key(key_id(seeded)) is None
        assert await stores.accounts.seed(acct, seeded, {"id": acct}) == SEEDED  # the variable set again

    _run(go())


def test_seeding_leaves_other_accounts_keys_and_admin_made_keys_alone(key_space):
    stores, acct, new_key = key_space

    async def go():
        theirs, admin_made = new_key(), new_key()
        await stores.accounts.add_key(acct + "-other", theirs)
        await stores.accounts.add_key(acct, admin_made)
        assert await stores.accounts.seed(acct, theirs, {"id": acct}) == SEED_TAKEN
        assert await stores.accounts.seed(acct, admin_made, {"id": acct}) == SEED_TAKEN
        assert await stores.keys.account_for(theirs) == acct + "-other"
        assert await stores.accounts.unseed(acct) == []
        assert await stores.keys.account_for(admin_made) == acct

    _run(go())


def test_the_key_store_reports_every_revocation(key_space, kind):
    """Memory: to its listeners, at once. Redis: on the revocation channel, to every process."""
    stores, acct, new_key = key_space

    async def go():
        a, b, c = new_key(), new_key(), new_key()
        heard: list[str] = []
        feed = None
        if kind == "memory":
            stores.keys.add_revocation_listener(heard.append)
        else:
            feed = stores.keys.revocation_feed()
            await feed.open()
        await stores.accounts.add_key(acct, a)
        await stores.accounts.seed(acct, b, {"id": acct})
        await stores.keys.put(c, acct)
        await stores.accounts.revoke_key(key_id(a))
        await stores.accounts.unseed(acct)
        await stores.keys.revoke(c)
        if feed is not None:
            while len(heard) < 3:
                event = await feed.get(timeout=2.0)
                assert event is not None, f"heard only {heard}"
                if event[0] == "revoked" and event[1] in (a, b, c):  # others may revoke keys too
                    heard.append(event[1])
            await feed.close()
        assert heard == [a, b, c]

    _run(go())


def test_a_dropped_revocation_feed_raises_instead_of_reconnecting_silently():
    async def go():
        import redis

        feed = RedisKeyStore(REDIS_URL).revocation_feed()
        await feed.open()
        r = redis.Redis.from_url(REDIS_URL)
        r.client_kill_filter(_id=feed.client_id)
        r.close()
        with pytest.raises(StoreUnavailable):
            for _ in range(20):
                await feed.ping("1")
                await feed.get(timeout=0.1)
        await feed.close()

    _run(go())


def test_ledger_shows_batch_usage_apart_within_the_totals(kind, ledger_prefix):
    async def go():
        ledger = _ledger(kind, ledger_prefix)
        acct = "acct-" + uuid.uuid4().hex
        assert await ledger.record(usage_event(acct, 3, cost=1.0))
        assert await ledger.record({**usage_event(acct, 6, cost=0.5), "tier": "batch"})
        [row] = await ledger.totals(acct)
        assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (2, 29, 18)
        assert (row["batch_requests"], row["batch_prompt_tokens"], row["batch_cached_tokens"],
                row["batch_completion_tokens"]) == (1, 16, 0, 12)
        assert row["cost_usd"] == pytest.approx(1.5) and row["batch_cost_usd"] == pytest.approx(0.5)

    _run(go())


# -- files and batches ---------------------------------------------------------------------------

@pytest.fixture
def batch_store(kind):
    from cluster.stores import MemoryBatchStore, RedisBatchStore

    if kind == "memory":
        yield MemoryBatchStore()
        return
    import redis

    prefix = f"ember:test:{uuid.uuid4().hex}:"
    yield RedisBatchStore(REDIS_URL, prefix=prefix)
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(prefix + "*"))
    if keys:
        r.delete(*keys)
    r.close()


def _batch(bid, account="acct-a", status="validating", created_at=100):
    return {"id": bid, "account": account, "status": status, "created_at": created_at, "endpoint": "/v1/completions",
            "metadata": None, "request_counts": {"total": 3, "completed": 0, "failed": 0}}


def test_files_are_scoped_to_their_account_and_paged_newest_first(batch_store):
    async def go():
        for i in range(5):
            await batch_store.put_file({"id": f"file-{i}", "account": "acct-a", "bytes": i, "created_at": 10 + i,
                                        "filename": "f.jsonl", "purpose": "batch"})
        await batch_store.put_file({"id": "file-x", "account": "acct-b", "bytes": 1, "created_at": 50,
                                    "filename": "x.jsonl", "purpose": "batch_output"})
        assert (await batch_store.get_file("acct-a", "file-2"))["bytes"] == 2
        assert await batch_store.get_file("acct-b", "file-2") is None
        page, more = await batch_store.list_files("acct-a", None, 2)
        assert [f["id"] for f in page] == ["file-4", "file-3"] and more
        page, more = await batch_store.list_files("acct-a", "file-3", 10)
        assert [f["id"] for f in page] == ["file-2", "file-1", "file-0"] and not more
        assert (await batch_store.list_files("acct-b", None, 10, purpose="batch"))[0] == []
        assert await batch_store.delete_file("acct-b", "file-1") is False
        assert await batch_store.delete_file("acct-a", "file-1") is True
        assert await batch_store.get_file("acct-a", "file-1") is None

    _run(go())


def test_batch_status_moves_only_from_the_expected_state(batch_store):
    async def go():
        await batch_store.put_batch(_batch("batch_1"))
        await batch_store.put_batch(_batch("batch_2", account="acct-b", created_at=101))
        assert sorted(await batch_store.active_batches()) == ["batch_1", "batch_2"]
        assert await batch_store.get_batch("acct-b", "batch_1") is None
        assert (await batch_store.get_batch(None, "batch_1"))["account"] == "acct-a"
        moved = await batch_store.update_batch("batch_1", {"status": "in_progress", "in_progress_at": 5},
                                               expect=("validating",))
        assert moved["status"] == "in_progress" and moved["in_progress_at"] == 5 and moved["metadata"] is None
        assert await batch_store.update_batch("batch_1", {"status": "failed"}, expect=("validating",)) is None
        assert await batch_store.update_batch("nope", {"status": "failed"}) is None
        await batch_store.update_batch("batch_1", {"status": "cancelled"}, expect=("in_progress",))
        assert await batch_store.active_batches() == ["batch_2"]
        assert [b["id"] for b in (await batch_store.list_batches("acct-a", None, 10))[0]] == ["batch_1"]

    _run(go())


def test_a_line_is_completed_once_and_counted_once(batch_store):
    async def go():
        await batch_store.put_batch(_batch("batch_l"))
        first = {"custom_id": "a", "response": {"status_code": 200}, "error": None}
        assert await batch_store.complete_line("batch_l", 7, first, failed=False) is True
        assert await batch_store.complete_line("batch_l", 7, {"custom_id": "a", "late": 1}, failed=False) is False
        assert await batch_store.complete_line("batch_l", 8, {"custom_id": "b"}, failed=True) is True
        assert await batch_store.line_results("batch_l") == {7: first, 8: {"custom_id": "b"}}
        assert await batch_store.counts("batch_l") == (1, 1)
        assert await batch_store.counts("batch_other") == (0, 0)

    _run(go())


def test_a_sealed_batch_refuses_later_results(batch_store):
    async def go():
        assert await batch_store.complete_line("batch_s", 1, {"n": 1}, failed=False) is True
        await batch_store.seal_lines("batch_s")
        await batch_store.seal_lines("batch_s")  # idempotent
        assert await batch_store.complete_line("batch_s", 2, {"n": 2}, failed=False) is False
        assert await batch_store.complete_line("batch_s", 3, {"n": 3}, failed=True) is False
        assert await batch_store.line_results("batch_s") == {1: {"n": 1}}
        assert await batch_store.counts("batch_s") == (1, 0)
        assert await batch_store.complete_line("batch_other", 2, {"n": 2}, failed=False) is True

    _run(go())


def test_concurrent_completions_of_one_line_store_one_result(batch_store):
    async def go():
        wins = await asyncio.gather(*(batch_store.complete_line("batch_c", 1, {"n": i}, failed=False)
                                      for i in range(20)))
        assert sum(wins) == 1
        assert await batch_store.counts("batch_c") == (1, 0)

    _run(go())
