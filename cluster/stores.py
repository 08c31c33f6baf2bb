"""Stores for stateful parts, chosen by URI: ``memory://`` (embedded default) or ``redis://...``.

API keys are stored only as SHA-256 hashes: a leaked store does not leak keys.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from typing import Protocol


class StoreUnavailable(RuntimeError):
    """The configured store cannot be reached."""


async def _redis_call(awaitable):
    try:
        return await awaitable
    except Exception as exc:  # redis raises many kinds (connection, timeout, busy loading)
        raise StoreUnavailable(f"redis: {exc}") from exc


def _redis(url: str, timeout_s: float):
    import redis.asyncio as redis

    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                socket_connect_timeout=timeout_s)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore(Protocol):
    async def put(self, key_hash: str, account: str) -> None: ...

    async def account_for(self, key_hash: str) -> str | None: ...

    async def revoke(self, key_hash: str) -> None: ...


class MemoryKeyStore:
    def __init__(self) -> None:
        self._keys: dict[str, str] = {}

    async def put(self, key_hash: str, account: str) -> None:
        self._keys[key_hash] = account

    async def account_for(self, key_hash: str) -> str | None:
        return self._keys.get(key_hash)

    async def revoke(self, key_hash: str) -> None:
        self._keys.pop(key_hash, None)


class RedisKeyStore:
    PREFIX = "ember:key:"

    def __init__(self, url: str, timeout_s: float = 0.5) -> None:
        self._r = _redis(url, timeout_s)

    async def put(self, key_hash: str, account: str) -> None:
        await _redis_call(self._r.set(self.PREFIX + key_hash, account))

    async def account_for(self, key_hash: str) -> str | None:
        return await _redis_call(self._r.get(self.PREFIX + key_hash))

    async def revoke(self, key_hash: str) -> None:
        await _redis_call(self._r.delete(self.PREFIX + key_hash))

    async def close(self) -> None:
        await self._r.aclose()


def key_store(url: str) -> KeyStore:
    if url == "memory://":
        return MemoryKeyStore()
    return RedisKeyStore(url)


# -- rate-limit state ---------------------------------------------------------------------


class LimitStore(Protocol):
    """Persists limiter state per scope ("account|model" or "account|*rpm") as an opaque dict.

    ``save`` never lets an older state overwrite a newer one (``stamp`` orders them), so a
    restarted or zombie limiter can't roll a limit back.
    """

    async def load(self, scope: str) -> dict | None: ...

    async def save(self, scope: str, state: dict, stamp: float) -> None: ...


class MemoryLimitStore:
    def __init__(self) -> None:
        self._data: dict[str, tuple[float, dict]] = {}

    async def load(self, scope: str) -> dict | None:
        item = self._data.get(scope)
        return None if item is None else item[1]

    async def save(self, scope: str, state: dict, stamp: float) -> None:
        old = self._data.get(scope)
        if old is None or old[0] <= stamp:
            self._data[scope] = (stamp, state)


class RedisLimitStore:
    PREFIX = "ember:rl:"
    # Compare-and-set on the stamp, atomically: KEYS[1] hash, ARGV[1] stamp, ARGV[2] state JSON.
    _SAVE = """
    local old = redis.call('HGET', KEYS[1], 'stamp')
    if old and tonumber(old) > tonumber(ARGV[1]) then return 0 end
    redis.call('HSET', KEYS[1], 'stamp', ARGV[1], 'state', ARGV[2])
    return 1
    """

    def __init__(self, url: str, timeout_s: float = 0.5) -> None:
        self._r = _redis(url, timeout_s)
        self._save = self._r.register_script(self._SAVE)

    async def load(self, scope: str) -> dict | None:
        import json

        raw = await _redis_call(self._r.hget(self.PREFIX + scope, "state"))
        return None if raw is None else json.loads(raw)

    async def save(self, scope: str, state: dict, stamp: float) -> None:
        import json

        await _redis_call(self._save(keys=[self.PREFIX + scope], args=[repr(stamp), json.dumps(state)]))


def limit_store(url: str) -> LimitStore:
    if url == "memory://":
        return MemoryLimitStore()
    return RedisLimitStore(url)


# -- accounts ---------------------------------------------------------------------------------

def key_id(key_hash: str) -> str:
    """A short public id for a key: safe to list and to revoke by, useless to authenticate."""
    return "key_" + key_hash[:16]


class AccountStore(Protocol):
    async def create(self, account: str, record: dict) -> bool: ...  # False if it exists

    async def get(self, account: str) -> dict | None: ...

    async def update(self, account: str, changes: dict) -> dict | None: ...

    async def add_key(self, account: str, key_hash: str) -> None: ...

    async def keys(self, account: str) -> list[str]: ...  # key hashes

    async def revoke_key(self, kid: str) -> str | None: ...  # the account it belonged to


class MemoryAccountStore:
    def __init__(self, keys: MemoryKeyStore) -> None:
        self._accounts: dict[str, dict] = {}
        self._keys_of: dict[str, list[str]] = {}
        self._key_store = keys

    async def create(self, account: str, record: dict) -> bool:
        if account in self._accounts:
            return False
        self._accounts[account] = dict(record)
        return True

    async def get(self, account: str) -> dict | None:
        rec = self._accounts.get(account)
        return None if rec is None else dict(rec)

    async def update(self, account: str, changes: dict) -> dict | None:
        if account not in self._accounts:
            return None
        self._accounts[account].update(changes)
        return dict(self._accounts[account])

    async def add_key(self, account: str, key_hash: str) -> None:
        self._keys_of.setdefault(account, []).append(key_hash)
        await self._key_store.put(key_hash, account)

    async def keys(self, account: str) -> list[str]:
        return list(self._keys_of.get(account, []))

    async def revoke_key(self, kid: str) -> str | None:
        for account, hashes in self._keys_of.items():
            for h in hashes:
                if key_id(h) == kid:
                    hashes.remove(h)
                    await self._key_store.revoke(h)
                    return account
        return None


class RedisAccountStore:
    PREFIX = "ember:acct:"

    def __init__(self, url: str, timeout_s: float = 0.5) -> None:
        self._r = _redis(url, timeout_s)

    async def create(self, account: str, record: dict) -> bool:
        import json

        return bool(await _redis_call(self._r.set(self.PREFIX + account, json.dumps(record), nx=True)))

    async def get(self, account: str) -> dict | None:
        import json

        raw = await _redis_call(self._r.get(self.PREFIX + account))
        return None if raw is None else json.loads(raw)

    async def update(self, account: str, changes: dict) -> dict | None:
        import json

        # Read-modify-write of one small JSON document; admin updates are rare and serial.
        rec = await self.get(account)
        if rec is None:
            return None
        rec.update(changes)
        await _redis_call(self._r.set(self.PREFIX + account, json.dumps(rec)))
        return rec

    async def add_key(self, account: str, key_hash: str) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.sadd(self.PREFIX + account + ":keys", key_hash)
        pipe.set(RedisKeyStore.PREFIX + key_hash, account)
        pipe.set("ember:keyid:" + key_id(key_hash), key_hash)
        await _redis_call(pipe.execute())

    async def keys(self, account: str) -> list[str]:
        return sorted(await _redis_call(self._r.smembers(self.PREFIX + account + ":keys")))

    async def revoke_key(self, kid: str) -> str | None:
        key_hash = await _redis_call(self._r.get("ember:keyid:" + kid))
        if key_hash is None:
            return None
        account = await _redis_call(self._r.get(RedisKeyStore.PREFIX + key_hash))
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(RedisKeyStore.PREFIX + key_hash, "ember:keyid:" + kid)
        if account:
            pipe.srem(self.PREFIX + account + ":keys", key_hash)
        await _redis_call(pipe.execute())
        return account


# -- the usage ledger ---------------------------------------------------------------------------

class LedgerStore(Protocol):
    """Usage events, each recorded exactly once by request id, with running totals.

    ``record`` returns False for a request id it has already recorded, so retrying a write whose
    answer was lost never bills twice.

    Bounded by design. The running totals (per account, model and day, and spend per account all
    time and per month) are kept forever: they are what is billed, and they are small. Raw events
    are only a recent window for inspection and export:

    - memory: the last ``max_events`` events (default 10,000) and the last ``dedupe_ids`` request
      ids (default 100,000, insertion order);
    - Redis: the stream ``<prefix>events`` is trimmed with ``XADD MAXLEN ~ max_events`` (default
      100,000; approximate, so it may hold somewhat more), and each seen request id expires after
      7 days.

    So exactly-once holds for a retry that arrives within the dedupe window: 7 days on Redis, the
    last 100,000 recorded requests in memory. The outbox retries within seconds to minutes of the
    first attempt, and a memory ledger dies with its process anyway.
    """

    async def record(self, event: dict) -> bool: ...

    async def totals(self, account: str) -> list[dict]: ...  # per (model, day)

    async def spend(self, account: str, month: str) -> tuple[float, float]: ...  # (all time, month)


_COUNTERS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_usd")
SEEN_TTL_S = 7 * 24 * 3600


class MemoryLedgerStore:
    def __init__(self, max_events: int = 10_000, dedupe_ids: int = 100_000) -> None:
        self.events: deque[dict] = deque(maxlen=max_events)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._dedupe_ids = dedupe_ids
        self._totals: dict[str, dict[tuple[str, str], dict]] = {}
        self._spend: dict[str, dict[str, float]] = {}

    async def record(self, event: dict) -> bool:
        rid = event["request_id"]
        if rid in self._seen:
            return False
        self._seen[rid] = None
        if len(self._seen) > self._dedupe_ids:
            self._seen.popitem(last=False)
        self.events.append(dict(event))
        row = self._totals.setdefault(event["account"], {}).setdefault(
            (event["model"], event["day"]), dict.fromkeys(_COUNTERS, 0))
        row["requests"] += 1
        for k in _COUNTERS[1:]:
            row[k] += event[k]
        sp = self._spend.setdefault(event["account"], {})
        sp["all"] = sp.get("all", 0.0) + event["cost_usd"]
        sp[event["day"][:7]] = sp.get(event["day"][:7], 0.0) + event["cost_usd"]
        return True

    async def totals(self, account: str) -> list[dict]:
        rows = self._totals.get(account, {})
        return [{"model": m, "day": d, **v} for (m, d), v in sorted(rows.items())]

    async def spend(self, account: str, month: str) -> tuple[float, float]:
        sp = self._spend.get(account, {})
        return sp.get("all", 0.0), sp.get(month, 0.0)


class RedisLedgerStore:
    """Events go to a Redis stream; one Lua script dedupes by request id and updates the totals.

    ``prefix`` namespaces every key (tests use their own; deployments keep the default).
    """

    _RECORD = """
    if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[9]) == false then return 0 end
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'event', ARGV[1])
    redis.call('HINCRBY', KEYS[3], ARGV[2] .. '|requests', 1)
    redis.call('HINCRBY', KEYS[3], ARGV[2] .. '|prompt_tokens', ARGV[3])
    redis.call('HINCRBY', KEYS[3], ARGV[2] .. '|cached_tokens', ARGV[4])
    redis.call('HINCRBY', KEYS[3], ARGV[2] .. '|completion_tokens', ARGV[5])
    redis.call('HINCRBYFLOAT', KEYS[3], ARGV[2] .. '|cost_usd', ARGV[6])
    redis.call('HINCRBYFLOAT', KEYS[4], 'all', ARGV[6])
    redis.call('HINCRBYFLOAT', KEYS[4], ARGV[7], ARGV[6])
    return 1
    """

    def __init__(self, url: str, timeout_s: float = 1.0, max_events: int = 100_000,
                 prefix: str = "ember:ledger:") -> None:
        self._r = _redis(url, timeout_s)
        self._record = self._r.register_script(self._RECORD)
        self.max_events = max_events
        self.prefix = prefix
        self.stream = prefix + "events"

    async def record(self, event: dict) -> bool:
        import json

        acct, p = event["account"], self.prefix
        keys = [p + "seen:" + event["request_id"], self.stream, p + "totals:" + acct, p + "spend:" + acct]
        args = [json.dumps(event), f"{event['model']}|{event['day']}", event["prompt_tokens"],
                event["cached_tokens"], event["completion_tokens"], repr(event["cost_usd"]), event["day"][:7],
                self.max_events, SEEN_TTL_S]
        return bool(await _redis_call(self._record(keys=keys, args=args)))

    async def totals(self, account: str) -> list[dict]:
        raw = await _redis_call(self._r.hgetall(self.prefix + "totals:" + account))
        rows: dict[tuple[str, str], dict] = {}
        for field, value in raw.items():
            model, day, counter = field.rsplit("|", 2)
            row = rows.setdefault((model, day), dict.fromkeys(_COUNTERS, 0))
            row[counter] = float(value) if counter == "cost_usd" else int(value)
        return [{"model": m, "day": d, **v} for (m, d), v in sorted(rows.items())]

    async def spend(self, account: str, month: str) -> tuple[float, float]:
        raw = await _redis_call(self._r.hmget(self.prefix + "spend:" + account, "all", month))
        return float(raw[0] or 0.0), float(raw[1] or 0.0)


class Stores:
    """Every store of one deployment, chosen by the store URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url == "memory://":
            mem_keys = MemoryKeyStore()
            self.keys: KeyStore = mem_keys
            self.accounts: AccountStore = MemoryAccountStore(mem_keys)
            self.ledger: LedgerStore = MemoryLedgerStore()
        else:
            self.keys = RedisKeyStore(url)
            self.accounts = RedisAccountStore(url)
            self.ledger = RedisLedgerStore(url)
