"""Stores for stateful parts, chosen by URI: ``memory://`` (embedded default) or ``redis://...``.

API keys are stored only as SHA-256 hashes: a leaked store does not leak keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict, deque
from typing import Callable, Protocol


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


# -- API keys ---------------------------------------------------------------------------------
#
# Redis layout (shared with the account store below):
#   ember:key:<hash>             -> account          the lookup on every request's path
#   ember:keyid:<key id>         -> hash             revoke by the public key id
#   ember:acct:<id>              -> record (JSON)
#   ember:acct:<id>:keys         set of hashes       the account's key index (listing)
#   ember:acct:<id>:seeded       set of hashes       keys seeded from the environment (the demo key)
#   ember:acct:<id>:seed-revoked set of hashes       seeded keys an admin revoked: never seeded again
# Every revocation is published on REVOCATION_CHANNEL (the key hash), so that each ingress
# replica drops it from its cache at once.

KEY_PREFIX = "ember:key:"
KEYID_PREFIX = "ember:keyid:"
ACCT_PREFIX = "ember:acct:"
REVOCATION_CHANNEL = "ember:keys:revoked"

# Seeding outcomes (``AccountStore.seed``).
SEEDED = "seeded"  # the key is (now) an env-seeded key of the account
SEED_REVOKED = "revoked"  # an admin revoked this key: it stays revoked while the variable holds it
SEED_TAKEN = "taken"  # the key belongs to another account, or is an admin-created key: left alone


class KeyStore(Protocol):
    """Key hash → account: the lookup on every request's path.

    ``shared`` says whether other processes use the same store (Redis): their revocations then
    arrive through ``revocation_feed()``. A store that is not shared tells the listeners added with
    ``add_revocation_listener`` about every revocation, synchronously.
    """

    shared: bool

    async def put(self, key_hash: str, account: str) -> None: ...

    async def account_for(self, key_hash: str) -> str | None: ...

    async def revoke(self, key_hash: str) -> None: ...

    def add_revocation_listener(self, listener: Callable[[str], None]) -> None: ...

    @property
    def accounts(self) -> "AccountStore": ...  # the account store over the same keys


class MemoryKeyStore:
    shared = False

    def __init__(self) -> None:
        self._keys: dict[str, str] = {}
        self._listeners: list[Callable[[str], None]] = []
        self._accounts: MemoryAccountStore | None = None  # set by MemoryAccountStore(self)

    @property
    def accounts(self) -> "MemoryAccountStore":
        if self._accounts is None:
            MemoryAccountStore(self)
        assert self._accounts is not None
        return self._accounts

    async def put(self, key_hash: str, account: str) -> None:
        self._keys[key_hash] = account

    async def account_for(self, key_hash: str) -> str | None:
        return self._keys.get(key_hash)

    async def revoke(self, key_hash: str) -> None:
        self._remove(key_hash, tombstone=True)

    def add_revocation_listener(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def _remove(self, key_hash: str, tombstone: bool) -> str | None:
        account = self._keys.pop(key_hash, None)
        if self._accounts is not None:
            self._accounts._unindex(key_hash, account, tombstone)
        for listener in self._listeners:
            listener(key_hash)
        return account


# Revoke one key everywhere: its lookup, its id, the account's index; a seeded key revoked this way
# is remembered (ARGV[3] == '1'), so that the environment does not bring it back. Publishes the hash.
# ARGV: 1 key hash ('' = find it by id), 2 key id, 3 tombstone, 4 channel. Returns the account.
_REVOKE_LUA = """
local h = ARGV[1]
if h == '' then
  h = redis.call('GET', 'ember:keyid:' .. ARGV[2])
  if not h then return false end
end
local acct = redis.call('GET', 'ember:key:' .. h)
redis.call('DEL', 'ember:key:' .. h)
local kid = 'ember:keyid:key_' .. string.sub(h, 1, 16)
if redis.call('GET', kid) == h then redis.call('DEL', kid) end
if acct then
  redis.call('SREM', 'ember:acct:' .. acct .. ':keys', h)
  if redis.call('SREM', 'ember:acct:' .. acct .. ':seeded', h) == 1 and ARGV[3] == '1' then
    redis.call('SADD', 'ember:acct:' .. acct .. ':seed-revoked', h)
  end
end
redis.call('PUBLISH', ARGV[4], h)
return acct
"""

# Make a key an env-seeded key of an account, creating the account if it is missing.
# ARGV: 1 account, 2 key hash, 3 account record (JSON), 4 key id. Returns SEEDED/SEED_*.
_SEED_LUA = """
local a, h = 'ember:acct:' .. ARGV[1], ARGV[2]
redis.call('SET', a, ARGV[3], 'NX')
if redis.call('SISMEMBER', a .. ':seed-revoked', h) == 1 then return 'revoked' end
local owner = redis.call('GET', 'ember:key:' .. h)
if owner and owner ~= ARGV[1] then return 'taken' end
if owner and redis.call('SISMEMBER', a .. ':keys', h) == 1
   and redis.call('SISMEMBER', a .. ':seeded', h) == 0 then return 'taken' end
redis.call('SET', 'ember:key:' .. h, ARGV[1])
redis.call('SET', 'ember:keyid:' .. ARGV[4], h)
redis.call('SADD', a .. ':keys', h)
redis.call('SADD', a .. ':seeded', h)
return 'seeded'
"""

# Remove an account's env-seeded keys except ARGV[2] ('' = all); publishes each. No tombstone: set
# the variable again and the key comes back. ARGV: 1 account, 2 keep, 3 channel. Returns the hashes.
_UNSEED_LUA = """
local a = 'ember:acct:' .. ARGV[1]
local removed = {}
for _, h in ipairs(redis.call('SMEMBERS', a .. ':seeded')) do
  if h ~= ARGV[2] then
    redis.call('SREM', a .. ':seeded', h)
    redis.call('SREM', a .. ':keys', h)
    if redis.call('GET', 'ember:key:' .. h) == ARGV[1] then redis.call('DEL', 'ember:key:' .. h) end
    local kid = 'ember:keyid:key_' .. string.sub(h, 1, 16)
    if redis.call('GET', kid) == h then redis.call('DEL', kid) end
    redis.call('PUBLISH', ARGV[3], h)
    table.insert(removed, h)
  end
end
return removed
"""


class RedisKeyStore:
    shared = True
    PREFIX = KEY_PREFIX

    def __init__(self, url: str, timeout_s: float = 0.5) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._r = _redis(url, timeout_s)
        self._revoke = self._r.register_script(_REVOKE_LUA)
        self._listeners: list[Callable[[str], None]] = []
        self._accounts: RedisAccountStore | None = None

    @property
    def accounts(self) -> "RedisAccountStore":
        if self._accounts is None:
            self._accounts = RedisAccountStore(self.url, self.timeout_s, client=self._r)
        return self._accounts

    async def put(self, key_hash: str, account: str) -> None:
        await _redis_call(self._r.set(self.PREFIX + key_hash, account))

    async def account_for(self, key_hash: str) -> str | None:
        return await _redis_call(self._r.get(self.PREFIX + key_hash))

    async def revoke(self, key_hash: str) -> None:
        await _redis_call(self._revoke(args=[key_hash, "", "1", REVOCATION_CHANNEL]))
        for listener in self._listeners:
            listener(key_hash)

    def add_revocation_listener(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def revocation_feed(self) -> "RedisRevocationFeed":
        return RedisRevocationFeed(self.url, self.timeout_s)

    async def close(self) -> None:
        await self._r.aclose()


class RedisRevocationFeed:
    """One subscription to REVOCATION_CHANNEL on a connection of its own, which never reconnects
    by itself: a dropped connection raises StoreUnavailable, so that the caller knows that it may
    have missed revocations (redis-py would otherwise reconnect and resubscribe silently).

    ``ping(token)`` is answered by ``("pong", token)`` in order with the messages: a pong for a ping
    sent at time t proves that every revocation published before t has been received.
    """

    def __init__(self, url: str, timeout_s: float = 0.5) -> None:
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # Bytes, not str: redis-py mis-parses the answer to PING <message> when it decodes.
        self._client = redis.Redis.from_url(url, decode_responses=False, socket_connect_timeout=timeout_s,
                                            socket_timeout=None, retry=Retry(NoBackoff(), 0),
                                            health_check_interval=0)
        self._pubsub = self._client.pubsub()
        self._timeout_s = timeout_s
        self.client_id: int | None = None  # the connection's CLIENT ID (tests kill it by id)

    async def open(self) -> None:
        """Subscribe, and return once Redis has confirmed the subscription."""
        async def connect() -> int:
            await self._pubsub.connect()
            conn = self._pubsub.connection
            await conn.send_command("CLIENT", "SETNAME", "ember-key-revocations")
            await conn.read_response()
            await conn.send_command("CLIENT", "ID")
            return int(await conn.read_response())

        self.client_id = await _redis_call(connect())
        await _redis_call(self._pubsub.subscribe(REVOCATION_CHANNEL))
        deadline = asyncio.get_running_loop().time() + max(self._timeout_s, 1.0)
        while True:
            msg = await _redis_call(self._pubsub.get_message(timeout=self._timeout_s))
            if msg is not None and msg["type"] in (b"subscribe", "subscribe"):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise StoreUnavailable("redis: no confirmation of the revocation subscription")

    async def ping(self, token: str) -> None:
        await _redis_call(self._pubsub.ping(token))

    async def get(self, timeout: float) -> tuple[str, str] | None:
        """The next event, ("revoked", key hash) or ("pong", token), or None after ``timeout``."""
        msg = await _redis_call(self._pubsub.get_message(timeout=timeout))
        if msg is None:
            return None
        kind = msg["type"].decode() if isinstance(msg["type"], bytes) else msg["type"]
        data = msg["data"].decode() if isinstance(msg["data"], bytes) else str(msg["data"])
        if kind == "message":
            return "revoked", data
        if kind == "pong":
            return "pong", data
        return None

    async def close(self) -> None:
        for close in (self._pubsub.aclose, self._client.aclose):
            try:
                await close()
            except Exception:  # closing a broken connection may fail too; nothing to do about it
                pass


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

    async def seeded_keys(self, account: str) -> list[str]: ...  # those of keys() seeded from the environment

    async def revoke_key(self, kid: str) -> str | None: ...  # the account it belonged to

    async def seed(self, account: str, key_hash: str, record: dict) -> str:
        """Make ``key_hash`` an env-seeded key of ``account`` (created with ``record`` if missing),
        indexed like any other key. Returns SEEDED, or SEED_REVOKED for a seeded key an admin
        revoked (it is not brought back), or SEED_TAKEN for a key that belongs to another account
        or that an admin created (left as it is). Idempotent."""
        ...

    async def unseed(self, account: str, keep: str | None = None) -> list[str]:
        """Remove the env-seeded keys of ``account`` other than ``keep``; returns their hashes.
        Keys created through ``add_key`` are never touched."""
        ...


class MemoryAccountStore:
    def __init__(self, keys: MemoryKeyStore) -> None:
        self._accounts: dict[str, dict] = {}
        self._keys_of: dict[str, list[str]] = {}
        self._seeded: dict[str, set[str]] = {}
        self._seed_revoked: dict[str, set[str]] = {}
        self._key_store = keys
        keys._accounts = self

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
        hashes = self._keys_of.setdefault(account, [])
        if key_hash not in hashes:
            hashes.append(key_hash)
        await self._key_store.put(key_hash, account)

    async def keys(self, account: str) -> list[str]:
        return list(self._keys_of.get(account, []))

    async def seeded_keys(self, account: str) -> list[str]:
        return sorted(self._seeded.get(account, set()))

    async def revoke_key(self, kid: str) -> str | None:
        for hashes in self._keys_of.values():
            for h in hashes:
                if key_id(h) == kid:
                    return self._key_store._remove(h, tombstone=True)
        return None

    async def seed(self, account: str, key_hash: str, record: dict) -> str:
        self._accounts.setdefault(account, dict(record))
        if key_hash in self._seed_revoked.get(account, set()):
            return SEED_REVOKED
        owner = await self._key_store.account_for(key_hash)
        seeded = self._seeded.setdefault(account, set())
        if owner is not None and (owner != account or (key_hash in self._keys_of.get(account, [])
                                                       and key_hash not in seeded)):
            return SEED_TAKEN
        await self.add_key(account, key_hash)
        seeded.add(key_hash)
        return SEEDED

    async def unseed(self, account: str, keep: str | None = None) -> list[str]:
        removed = sorted(h for h in self._seeded.get(account, set()) if h != keep)
        for h in removed:
            if self._key_store._keys.get(h) == account:
                self._key_store._remove(h, tombstone=False)
            else:
                self._unindex(h, account, tombstone=False)
        return removed

    def _unindex(self, key_hash: str, account: str | None, tombstone: bool) -> None:
        for acct in ([account] if account is not None else list(self._keys_of)):
            hashes = self._keys_of.get(acct)
            if hashes and key_hash in hashes:
                hashes.remove(key_hash)
            seeded = self._seeded.get(acct)
            if seeded and key_hash in seeded:
                seeded.discard(key_hash)
                if tombstone:
                    self._seed_revoked.setdefault(acct, set()).add(key_hash)


class RedisAccountStore:
    PREFIX = ACCT_PREFIX

    def __init__(self, url: str, timeout_s: float = 0.5, client=None) -> None:
        self._r = client if client is not None else _redis(url, timeout_s)
        self._revoke = self._r.register_script(_REVOKE_LUA)
        self._seed = self._r.register_script(_SEED_LUA)
        self._unseed = self._r.register_script(_UNSEED_LUA)

    async def create(self, account: str, record: dict) -> bool:
        return bool(await _redis_call(self._r.set(self.PREFIX + account, json.dumps(record), nx=True)))

    async def get(self, account: str) -> dict | None:
        raw = await _redis_call(self._r.get(self.PREFIX + account))
        return None if raw is None else json.loads(raw)

    async def update(self, account: str, changes: dict) -> dict | None:
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
        pipe.set(KEY_PREFIX + key_hash, account)
        pipe.set(KEYID_PREFIX + key_id(key_hash), key_hash)
        await _redis_call(pipe.execute())

    async def keys(self, account: str) -> list[str]:
        return sorted(await _redis_call(self._r.smembers(self.PREFIX + account + ":keys")))

    async def seeded_keys(self, account: str) -> list[str]:
        return sorted(await _redis_call(self._r.smembers(self.PREFIX + account + ":seeded")))

    async def revoke_key(self, kid: str) -> str | None:
        return await _redis_call(self._revoke(args=["", kid, "1", REVOCATION_CHANNEL]))

    async def seed(self, account: str, key_hash: str, record: dict) -> str:
        return await _redis_call(self._seed(args=[account, key_hash, json.dumps(record), key_id(key_hash)]))

    async def unseed(self, account: str, keep: str | None = None) -> list[str]:
        return list(await _redis_call(self._unseed(args=[account, keep or "", REVOCATION_CHANNEL])))


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

    async def recorded(self, request_ids: list[str]) -> set[str]: ...  # those of the ids already recorded

    async def totals(self, account: str) -> list[dict]: ...  # per (model, day)

    async def spend(self, account: str, month: str) -> tuple[float, float]: ...  # (all time, month)


_COUNTERS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_usd")
# Batch events count in the totals above and, again, in these (``/v1/usage`` shows batch apart).
_BATCH_COUNTERS = tuple("batch_" + c for c in _COUNTERS)
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
            (event["model"], event["day"]), dict.fromkeys(_COUNTERS + _BATCH_COUNTERS, 0))
        for prefix in ("", "batch_") if event.get("tier") == "batch" else ("",):
            row[prefix + "requests"] += 1
            for k in _COUNTERS[1:]:
                row[prefix + k] += event[k]
        sp = self._spend.setdefault(event["account"], {})
        sp["all"] = sp.get("all", 0.0) + event["cost_usd"]
        sp[event["day"][:7]] = sp.get(event["day"][:7], 0.0) + event["cost_usd"]
        return True

    async def recorded(self, request_ids: list[str]) -> set[str]:
        return {r for r in request_ids if r in self._seen}

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
    if ARGV[10] == 'batch' then
      redis.call('HINCRBY', KEYS[3], ARGV[2] .. '|batch_requests', 1)
      redis.call('HINCRBY', KEYS[3], ARGV[2] .. '|batch_prompt_tokens', ARGV[3])
      redis.call('HINCRBY', KEYS[3], ARGV[2] .. '|batch_cached_tokens', ARGV[4])
      redis.call('HINCRBY', KEYS[3], ARGV[2] .. '|batch_completion_tokens', ARGV[5])
      redis.call('HINCRBYFLOAT', KEYS[3], ARGV[2] .. '|batch_cost_usd', ARGV[6])
    end
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
                self.max_events, SEEN_TTL_S, event.get("tier") or ""]
        return bool(await _redis_call(self._record(keys=keys, args=args)))

    async def recorded(self, request_ids: list[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(request_ids), 1000):
            chunk = request_ids[i:i + 1000]
            pipe = self._r.pipeline(transaction=False)
            for rid in chunk:
                pipe.exists(self.prefix + "seen:" + rid)
            found.update(r for r, hit in zip(chunk, await _redis_call(pipe.execute())) if hit)
        return found

    async def totals(self, account: str) -> list[dict]:
        raw = await _redis_call(self._r.hgetall(self.prefix + "totals:" + account))
        rows: dict[tuple[str, str], dict] = {}
        for field, value in raw.items():
            model, day, counter = field.rsplit("|", 2)
            row = rows.setdefault((model, day), dict.fromkeys(_COUNTERS + _BATCH_COUNTERS, 0))
            row[counter] = float(value) if counter.endswith("cost_usd") else int(value)
        return [{"model": m, "day": d, **v} for (m, d), v in sorted(rows.items())]

    async def spend(self, account: str, month: str) -> tuple[float, float]:
        raw = await _redis_call(self._r.hmget(self.prefix + "spend:" + account, "all", month))
        return float(raw[0] or 0.0), float(raw[1] or 0.0)


# -- stored responses (POST /v1/responses with store: true) -------------------------------------

class ResponseStore(Protocol):
    """Stored responses, each readable only under the account that created it, for ``ttl_s``.

    Keys are scoped by account (Redis: ``ember:resp:<account>:<id>``), so another account's id is
    simply not there: a lookup by the wrong account finds nothing, exactly as an unknown id.
    """

    async def put(self, account: str, response_id: str, record: dict, ttl_s: float) -> None: ...

    async def get(self, account: str, response_id: str) -> dict | None: ...

    async def delete(self, account: str, response_id: str) -> bool: ...  # False if it was not there


class MemoryResponseStore:
    def __init__(self, clock: Callable[[], float] | None = None, max_items: int = 10_000) -> None:
        import time

        self._clock = clock or time.monotonic
        self._items: OrderedDict[tuple[str, str], tuple[float, str]] = OrderedDict()
        self._max_items = max_items

    async def put(self, account: str, response_id: str, record: dict, ttl_s: float) -> None:
        self._items[(account, response_id)] = (self._clock() + ttl_s, json.dumps(record))
        while len(self._items) > self._max_items:
            self._items.popitem(last=False)

    async def get(self, account: str, response_id: str) -> dict | None:
        item = self._items.get((account, response_id))
        if item is None:
            return None
        if item[0] <= self._clock():
            del self._items[(account, response_id)]
            return None
        return json.loads(item[1])

    async def delete(self, account: str, response_id: str) -> bool:
        found = await self.get(account, response_id) is not None
        self._items.pop((account, response_id), None)
        return found


RESPONSE_PREFIX = "ember:resp:"


class RedisResponseStore:
    def __init__(self, url: str, timeout_s: float = 1.0, prefix: str = RESPONSE_PREFIX) -> None:
        self._r = _redis(url, timeout_s)
        self.prefix = prefix

    def _key(self, account: str, response_id: str) -> str:
        return f"{self.prefix}{account}:{response_id}"

    async def put(self, account: str, response_id: str, record: dict, ttl_s: float) -> None:
        await _redis_call(self._r.set(self._key(account, response_id), json.dumps(record),
                                      px=max(1, int(ttl_s * 1000))))

    async def get(self, account: str, response_id: str) -> dict | None:
        raw = await _redis_call(self._r.get(self._key(account, response_id)))
        return json.loads(raw) if raw is not None else None

    async def delete(self, account: str, response_id: str) -> bool:
        return bool(await _redis_call(self._r.delete(self._key(account, response_id))))


# -- files and batches ---------------------------------------------------------------------------

TERMINAL_BATCH_STATES = ("completed", "failed", "expired", "cancelled")


class BatchStore(Protocol):
    """File and batch records of the Files and Batches API, and each batch line's progress.

    Records are JSON objects with at least ``id``, ``account`` and ``created_at`` (seconds; an
    optional ``created_us`` orders records made within one second); reads are
    scoped to an account (another account's record is None, as if it did not exist). Lists are
    newest first, paged by ``after`` (the last id of the previous page).

    Exactly-once lines:

    - ``complete_line`` stores a line's result only if it has none yet and the batch's results
      are not sealed, and bumps the batch's completed or failed count in the same atomic step. A
      second completion of the same line (a retry whose first attempt was still running) is
      refused and counts nothing;
    - ``seal_lines`` closes the batch's results before its output is written: a completion that
      arrives later (a line that finished as its batch was cancelled) is refused, so the output
      files hold every stored result. Whoever stores a result bills it (``deployments.batch_api``):
      refused, it is not billed.

    ``update_batch`` is a compare-and-set on the status (``expect``), so two runners (or a runner
    and a cancel request) never both move a batch out of one state. Batches not yet in a terminal
    state are in ``active_batches()``.
    """

    async def put_file(self, record: dict) -> None: ...

    async def get_file(self, account: str, file_id: str) -> dict | None: ...

    async def list_files(self, account: str, after: str | None, limit: int,
                         purpose: str | None = None) -> tuple[list[dict], bool]: ...  # (page, has_more)

    async def delete_file(self, account: str, file_id: str) -> bool: ...

    async def put_batch(self, record: dict) -> None: ...

    async def get_batch(self, account: str | None, batch_id: str) -> dict | None: ...  # None: any account

    async def list_batches(self, account: str, after: str | None, limit: int) -> tuple[list[dict], bool]: ...

    async def update_batch(self, batch_id: str, changes: dict, expect: tuple[str, ...] | None = None) -> dict | None:
        """Merge ``changes`` if the batch's status is one of ``expect`` (None: any); returns the
        new record, or None if the batch is missing or in another state."""
        ...

    async def active_batches(self) -> list[str]: ...


    async def complete_line(self, batch_id: str, index: int, result: dict, failed: bool) -> bool: ...

    async def seal_lines(self, batch_id: str) -> None: ...  # later complete_line calls are refused

    async def line_results(self, batch_id: str) -> dict[int, dict]: ...

    async def counts(self, batch_id: str) -> tuple[int, int]: ...  # (completed, failed)


def _order(record: dict) -> float:
    """Creation order: ``created_us`` (microseconds) where the record has it, else ``created_at``."""
    return record.get("created_us") or record["created_at"] * 1e6


def _page(records: list[dict], after: str | None, limit: int) -> tuple[list[dict], bool]:
    records.sort(key=lambda r: (_order(r), r["id"]), reverse=True)
    if after is not None:
        ids = [r["id"] for r in records]
        records = records[ids.index(after) + 1:] if after in ids else []
    return records[:limit], len(records) > limit


class MemoryBatchStore:
    def __init__(self) -> None:
        self._files: dict[str, dict] = {}
        self._batches: dict[str, dict] = {}
        self._results: dict[str, dict[int, dict]] = {}
        self._counts: dict[str, list[int]] = {}
        self._sealed: set[str] = set()

    async def put_file(self, record: dict) -> None:
        self._files[record["id"]] = dict(record)

    async def get_file(self, account: str, file_id: str) -> dict | None:
        rec = self._files.get(file_id)
        return dict(rec) if rec is not None and rec["account"] == account else None

    async def list_files(self, account, after, limit, purpose=None):
        mine = [dict(r) for r in self._files.values()
                if r["account"] == account and (purpose is None or r["purpose"] == purpose)]
        return _page(mine, after, limit)

    async def delete_file(self, account: str, file_id: str) -> bool:
        if await self.get_file(account, file_id) is None:
            return False
        del self._files[file_id]
        return True

    async def put_batch(self, record: dict) -> None:
        self._batches[record["id"]] = dict(record)

    async def get_batch(self, account, batch_id):
        rec = self._batches.get(batch_id)
        if rec is None or (account is not None and rec["account"] != account):
            return None
        return dict(rec)

    async def list_batches(self, account, after, limit):
        return _page([dict(r) for r in self._batches.values() if r["account"] == account], after, limit)

    async def update_batch(self, batch_id, changes, expect=None):
        rec = self._batches.get(batch_id)
        if rec is None or (expect is not None and rec["status"] not in expect):
            return None
        rec.update(changes)
        return dict(rec)

    async def active_batches(self) -> list[str]:
        return [b for b, r in self._batches.items() if r["status"] not in TERMINAL_BATCH_STATES]


    async def complete_line(self, batch_id, index, result, failed):
        results = self._results.setdefault(batch_id, {})
        if index in results or batch_id in self._sealed:
            return False
        results[index] = dict(result)
        self._counts.setdefault(batch_id, [0, 0])[1 if failed else 0] += 1
        return True

    async def seal_lines(self, batch_id):
        self._sealed.add(batch_id)

    async def line_results(self, batch_id):
        return {i: dict(r) for i, r in self._results.get(batch_id, {}).items()}

    async def counts(self, batch_id):
        c = self._counts.get(batch_id, [0, 0])
        return c[0], c[1]


class RedisBatchStore:
    """Redis layout (``prefix`` defaults to ``ember:``):

    - ``files:<id>`` / ``batches:<id>``: the record (JSON);
    - ``files:acct:<account>`` / ``batches:acct:<account>``: sorted set of ids by creation time;
    - ``batches:active``: set of batch ids not in a terminal state;
    - ``batch:<id>:results``: hash line → result
      (JSON); ``batch:<id>:counts``: hash with ``completed`` and ``failed``, and ``sealed`` once
      the results are sealed.
    """

    # Compare-and-set on the status: KEYS 1 record, 2 active set; ARGV 1 changes (JSON),
    # 2 expected statuses (JSON list, or '' for any), 3 batch id, 4 terminal statuses (JSON list).
    _UPDATE = """
    local raw = redis.call('GET', KEYS[1])
    if not raw then return false end
    local rec = cjson.decode(raw)
    if ARGV[2] ~= '' then
      local ok = false
      for _, s in ipairs(cjson.decode(ARGV[2])) do if rec['status'] == s then ok = true end end
      if not ok then return false end
    end
    for k, v in pairs(cjson.decode(ARGV[1])) do rec[k] = v end
    local out = cjson.encode(rec)
    redis.call('SET', KEYS[1], out)
    for _, s in ipairs(cjson.decode(ARGV[4])) do
      if rec['status'] == s then redis.call('SREM', KEYS[2], ARGV[3]) end
    end
    return out
    """
    # KEYS 1 results, 2 counts; ARGV 1 line, 2 result (JSON), 3 counter name.
    _COMPLETE = """
    if redis.call('HEXISTS', KEYS[2], 'sealed') == 1 then return 0 end
    if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
    redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
    return 1
    """

    def __init__(self, url: str, timeout_s: float = 2.0, prefix: str = "ember:") -> None:
        self._r = _redis(url, timeout_s)
        self.prefix = prefix
        self._update = self._r.register_script(self._UPDATE)
        self._complete = self._r.register_script(self._COMPLETE)

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def _put(self, kind: str, record: dict, active: bool = False) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.set(self._k(kind, record["id"]), json.dumps(record))
        pipe.zadd(self._k(kind, "acct", record["account"]), {record["id"]: _order(record)})
        if active:
            pipe.sadd(self._k("batches", "active"), record["id"])
        await _redis_call(pipe.execute())

    async def _get(self, kind: str, account: str | None, rid: str) -> dict | None:
        raw = await _redis_call(self._r.get(self._k(kind, rid)))
        if raw is None:
            return None
        rec = json.loads(raw)
        return rec if account is None or rec["account"] == account else None

    async def _list(self, kind: str, account: str) -> list[dict]:
        ids = await _redis_call(self._r.zrange(self._k(kind, "acct", account), 0, -1))
        if not ids:
            return []
        raws = await _redis_call(self._r.mget([self._k(kind, i) for i in ids]))
        return [json.loads(r) for r in raws if r is not None]

    async def put_file(self, record: dict) -> None:
        await self._put("files", record)

    async def get_file(self, account: str, file_id: str) -> dict | None:
        return await self._get("files", account, file_id)

    async def list_files(self, account, after, limit, purpose=None):
        recs = [r for r in await self._list("files", account) if purpose is None or r["purpose"] == purpose]
        return _page(recs, after, limit)

    async def delete_file(self, account: str, file_id: str) -> bool:
        if await self.get_file(account, file_id) is None:
            return False
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(self._k("files", file_id))
        pipe.zrem(self._k("files", "acct", account), file_id)
        await _redis_call(pipe.execute())
        return True

    async def put_batch(self, record: dict) -> None:
        await self._put("batches", record, active=record["status"] not in TERMINAL_BATCH_STATES)

    async def get_batch(self, account, batch_id):
        return await self._get("batches", account, batch_id)

    async def list_batches(self, account, after, limit):
        return _page(await self._list("batches", account), after, limit)

    async def update_batch(self, batch_id, changes, expect=None):
        raw = await _redis_call(self._update(
            keys=[self._k("batches", batch_id), self._k("batches", "active")],
            args=[json.dumps(changes), json.dumps(list(expect)) if expect is not None else "", batch_id,
                  json.dumps(list(TERMINAL_BATCH_STATES))]))
        return None if raw is None else json.loads(raw)

    async def active_batches(self) -> list[str]:
        return sorted(await _redis_call(self._r.smembers(self._k("batches", "active"))))


    async def complete_line(self, batch_id, index, result, failed):
        return bool(await _redis_call(self._complete(
            keys=[self._k("batch", batch_id, "results"), self._k("batch", batch_id, "counts")],
            args=[str(index), json.dumps(result), "failed" if failed else "completed"])))

    async def seal_lines(self, batch_id):
        await _redis_call(self._r.hset(self._k("batch", batch_id, "counts"), "sealed", 1))

    async def line_results(self, batch_id):
        raw = await _redis_call(self._r.hgetall(self._k("batch", batch_id, "results")))
        return {int(i): json.loads(r) for i, r in raw.items()}

    async def counts(self, batch_id):
        raw = await _redis_call(self._r.hmget(self._k("batch", batch_id, "counts"), "completed", "failed"))
        return int(raw[0] or 0), int(raw[1] or 0)


class Stores:
    """Every store of one deployment, chosen by the store URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url == "memory://":
            mem_keys = MemoryKeyStore()
            self.keys: KeyStore = mem_keys
            self.accounts: AccountStore = MemoryAccountStore(mem_keys)
            self.ledger: LedgerStore = MemoryLedgerStore()
            self.responses: ResponseStore = MemoryResponseStore()
            self.batches: BatchStore = MemoryBatchStore()
        else:
            self.keys = RedisKeyStore(url)
            self.accounts = RedisAccountStore(url)
            self.ledger = RedisLedgerStore(url)
            self.responses = RedisResponseStore(url)
            self.batches = RedisBatchStore(url)
