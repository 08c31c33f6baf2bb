"""Auth hardening on real Redis and a real Serve app: revocations reach every ingress replica within
a second, the demo key is an ordinary key (listed, revocable, removed when its variable is gone),
failed keys and admin tokens are throttled per source, and a store outage is survived."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import time
import uuid

import httpx
import openai
import pytest

from cluster.cli import main as cli
from cluster.config import AuthConfig
from cluster.stores import Stores, hash_key, key_id
from deployments.auth import KeyAuth
from deployments.errors import ApiError
from tests.conftest import ADMIN_TOKEN, DEMO_KEY

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
MODEL = "accounts/ember/models/authsec"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _redis():
    import redis

    return redis.Redis.from_url(REDIS_URL, decode_responses=True)


@pytest.fixture
def accounts():
    """Fresh account ids; afterwards everything Redis holds for them (records, keys, seeds) goes."""
    made: list[str] = []

    def new(prefix: str = "authsec") -> str:
        made.append(f"{prefix}-{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield new
    r = _redis()
    for acct in made:
        for suffix in (":keys", ":seeded", ":seed-revoked"):
            for h in r.smembers(f"ember:acct:{acct}{suffix}"):
                r.delete(f"ember:key:{h}", f"ember:keyid:{key_id(h)}")
        r.delete(*[f"ember:acct:{acct}{s}" for s in ("", ":keys", ":seeded", ":seed-revoked")])
    r.close()


async def _until(condition, timeout_s: float, every_s: float = 0.01) -> float:
    """Await ``condition()`` (sync or async) becoming true; returns the seconds it took."""
    start = time.monotonic()
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not true within {timeout_s} s")
        await asyncio.sleep(every_s)


async def _status(auth: KeyAuth, digest: str) -> str | int:
    try:
        return await auth.verify(digest, "203.0.113.50")
    except ApiError as e:
        return e.status


# -- revocation across ingress replicas (two KeyAuth on one Redis) -----------------------------

def test_a_revocation_reaches_the_other_replica_within_a_second_through_pub_sub(accounts):
    acct = accounts()

    async def go():
        admin_side, other_side = Stores(REDIS_URL), Stores(REDIS_URL)
        a = KeyAuth(admin_side.keys, None, accounts("demo"))
        # Caches for 5 minutes and would not re-read a key for 60 s without the feed: only the
        # published revocation can make it reject the key within a second.
        b = KeyAuth(other_side.keys, None, accounts("demo"),
                    config=AuthConfig(key_cache_ttl_s=300, revocation_max_delay_s=60))
        digest = hash_key("ember-" + uuid.uuid4().hex)
        await admin_side.accounts.create(acct, {"id": acct})
        await admin_side.accounts.add_key(acct, digest)
        await _until(lambda: a.feed_live and b.feed_live, timeout_s=10)
        assert await _status(a, digest) == acct and await _status(b, digest) == acct
        assert b._cache[digest].feed is not None  # cached under the live feed
        assert await admin_side.accounts.revoke_key(key_id(digest)) == acct
        took = await _until(lambda: digest not in b._cache, timeout_s=1.0)
        assert await _status(b, digest) == 401 and await _status(a, digest) == 401
        await a.close()
        await b.close()
        return took

    assert asyncio.run(go()) < 1.0


def test_with_the_feed_down_a_revoked_key_still_stops_within_a_second_and_the_feed_comes_back(accounts):
    acct = accounts()

    async def go():
        admin_side, other_side = Stores(REDIS_URL), Stores(REDIS_URL)
        b = KeyAuth(other_side.keys, None, accounts("demo"))  # defaults: 30 s cache, 1 s without feed
        digest = hash_key("ember-" + uuid.uuid4().hex)
        await admin_side.accounts.create(acct, {"id": acct})
        await admin_side.accounts.add_key(acct, digest)
        await _until(lambda: b.feed_live, timeout_s=10)
        assert await _status(b, digest) == acct
        first_feed = b.feed_client_id
        r = _redis()
        r.client_kill_filter(_id=first_feed)  # the revocation below may be published into the void
        r.close()
        await admin_side.keys.revoke(digest)
        revoked = time.monotonic()
        while await _status(b, digest) != 401:
            assert time.monotonic() - revoked < 1.05, "a revoked key outlived revocation_max_delay_s"
            await asyncio.sleep(0.01)
        await _until(lambda: b.feed_live and b.feed_client_id != first_feed, timeout_s=10)
        await b.close()

    asyncio.run(go())


def test_a_store_outage_is_survived_by_keys_verified_recently_and_only_by_them():
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from tests.faults.harness import PrivateRedis

    private = PrivateRedis()
    private.start()
    try:
        async def go():
            stores = Stores(private.url)
            digest, unseen = hash_key("ember-known"), hash_key("ember-unseen")
            await stores.accounts.add_key("acme", digest)
            await stores.accounts.add_key("acme", unseen)
            open_auth = KeyAuth(stores.keys, None, "demo")
            closed_auth = KeyAuth(stores.keys, None, "demo", config=AuthConfig(store_outage_grace_s=0))
            assert await _status(open_auth, digest) == "acme" and await _status(closed_auth, digest) == "acme"
            private.stop()
            await _until(lambda: not open_auth.feed_live, timeout_s=5)  # the cache alone no longer suffices
            assert await _status(open_auth, digest) == "acme"  # verified a moment ago: fail open
            assert await _status(open_auth, unseen) == 503
            assert await _status(closed_auth, digest) == 503
            private.start()
            await _until(lambda: open_auth.feed_live, timeout_s=15)
            assert await _status(closed_auth, digest) == "acme" and await _status(open_auth, unseen) == "acme"
            await open_auth.close()
            await closed_auth.close()

        asyncio.run(go())
    finally:
        private.cleanup()


# -- through Serve --------------------------------------------------------------------------------

def _config(store: str = "memory://", **auth) -> dict:
    return {
        "models": [{"id": MODEL, "context_length": 512, "num_replicas": 1, "resources": {"num_cpus": 0.05},
                    "engine": {"kind": "sim", "block_size": 32}}],
        "ingress": {"num_cpus": 0.05},
        "store": {"url": store},
        "rate_limit": {"enabled": False},
        "auth": auth,
    }


@contextlib.contextmanager
def _env(**values: str | None):
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def deploy(serve_instance):
    """deploy(name, config, EMBER_DEMO_KEY=...) → the app's base URL; the variables given are set
    (None: unset) only while the app is built. Apps are deleted at the end of the module."""
    from ray import serve

    from cluster.builder import build_app

    names: set[str] = set()

    def _deploy(name: str, config: dict, **env: str | None) -> str:
        with _env(**env):
            app = build_app(config)
        serve.run(app, name=name, route_prefix=f"/{name}")
        names.add(name)
        return f"{serve_instance}/{name}"

    yield _deploy
    for n in names:
        serve.delete(n)


def _client(url: str, key: str, source: str | None = None) -> openai.OpenAI:
    headers = {"X-Forwarded-For": source} if source else None
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30, default_headers=headers)


def _cli(url: str, *args: str) -> tuple[int, dict | None]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = cli(["--url", url, "--admin-token", ADMIN_TOKEN, *args])
    return code, (json.loads(out.getvalue()) if code == 0 else None)


def test_the_demo_key_is_an_ordinary_key_listed_revocable_and_its_account_reserved(deploy, accounts):
    demo, demo_key = accounts("demo"), "ember-demo-" + uuid.uuid4().hex
    cfg = _config(REDIS_URL, demo_account=demo)
    url = deploy("authsec-demo", cfg, EMBER_DEMO_KEY=demo_key)
    assert _client(url, demo_key).models.list().data
    code, listing = _cli(url, "keys", "list", demo)
    assert code == 0 and listing["data"] == [{"id": key_id(hash_key(demo_key)), "env_seeded": True}]

    dupe = accounts()
    assert _cli(url, "accounts", "create", dupe)[0] == 0
    for taken in (demo, dupe):
        r = httpx.post(url + "/admin/accounts", json={"id": taken}, headers=ADMIN, timeout=30)
        assert r.status_code == 409
        assert r.json() == {"error": {"message": f"account `{taken}` already exists",
                                      "type": "invalid_request_error", "param": "id", "code": "account_exists"}}

    assert _cli(url, "keys", "revoke", key_id(hash_key(demo_key)))[0] == 0
    with pytest.raises(openai.AuthenticationError):
        _client(url, demo_key).models.list()
    # A new replica (a redeploy with the same variable) does not bring the revoked key back.
    url = deploy("authsec-demo", {**cfg, "ingress": {"num_cpus": 0.06}}, EMBER_DEMO_KEY=demo_key)
    with pytest.raises(openai.AuthenticationError):
        _client(url, demo_key).models.list()
    assert _cli(url, "keys", "list", demo) == (0, {"object": "list", "data": []})


def test_the_demo_key_is_removed_when_the_app_restarts_without_its_variable(deploy, accounts):
    demo, demo_key = accounts("demo"), "ember-demo-" + uuid.uuid4().hex
    cfg = _config(REDIS_URL, demo_account=demo)
    url = deploy("authsec-unset", cfg, EMBER_DEMO_KEY=demo_key)
    assert _client(url, demo_key).models.list().data
    code, made = _cli(url, "keys", "create", demo)  # an admin's key for the demo account stays
    assert code == 0

    url = deploy("authsec-unset", cfg, EMBER_DEMO_KEY=None)
    with pytest.raises(openai.AuthenticationError):
        _client(url, demo_key).models.list()
    assert _client(url, made["key"]).models.list().data
    code, listing = _cli(url, "keys", "list", demo)
    assert code == 0 and listing["data"] == [{"id": made["id"], "env_seeded": False}]


@pytest.fixture(scope="module")
def plain_app(deploy) -> str:
    return deploy("authsec", _config(), EMBER_DEMO_KEY=DEMO_KEY)


def test_bad_keys_from_one_source_get_429_then_that_source_waits_and_others_do_not(plain_app):
    # Serve's proxy (uvicorn) takes the client from X-Forwarded-For only for peers it trusts
    # (FORWARDED_ALLOW_IPS, loopback by default): these requests come from loopback, so each
    # forwarded address below is a source of its own.
    attacker, neighbour = "198.51.100.77", "198.51.100.78"
    limit = AuthConfig().failed_auth_limit
    for i in range(limit):
        with pytest.raises(openai.AuthenticationError):
            _client(plain_app, f"ember-guess-{i}", attacker).models.list()
    with pytest.raises(openai.RateLimitError) as e:
        _client(plain_app, DEMO_KEY, attacker).models.list()  # even a good key: no store lookups
    assert e.value.body["code"] == "too_many_auth_failures" and e.value.body["type"] == "rate_limit_error"
    assert 1 <= int(e.value.response.headers["retry-after"]) <= AuthConfig().failed_auth_window_s
    assert _client(plain_app, DEMO_KEY, neighbour).models.list().data
    assert _client(plain_app, DEMO_KEY).models.list().data  # the loopback peer itself


def test_failed_admin_tokens_are_throttled_per_source(plain_app):
    attacker, neighbour = "198.51.100.90", "198.51.100.91"
    for i in range(AuthConfig().admin_failed_limit):
        r = httpx.get(plain_app + "/admin/accounts/demo", timeout=30,
                      headers={"Authorization": f"Bearer guess-{i}", "X-Forwarded-For": attacker})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_token"
    r = httpx.get(plain_app + "/admin/accounts/demo", headers={**ADMIN, "X-Forwarded-For": attacker}, timeout=30)
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_auth_failures"
    assert int(r.headers["retry-after"]) >= 1
    r = httpx.get(plain_app + "/admin/accounts/demo", headers={**ADMIN, "X-Forwarded-For": neighbour}, timeout=30)
    assert r.status_code == 200 and r.json()["demo"] is True
    assert _cli(plain_app, "accounts", "show", "demo")[0] == 0


def test_the_admin_api_moves_with_its_prefix_and_can_be_switched_off(deploy):
    moved = deploy("authsec-moved", _config(admin_prefix="/ops/ember-admin/"))
    r = httpx.post(moved + "/ops/ember-admin/accounts", json={"id": "moved-acct"}, headers=ADMIN, timeout=30)
    assert r.status_code == 201
    assert httpx.get(moved + "/admin/accounts/moved-acct", headers=ADMIN, timeout=30).status_code == 404
    assert _cli(moved, "--admin-prefix", "/ops/ember-admin/", "accounts", "show", "moved-acct")[0] == 0

    off = deploy("authsec-off", _config(admin_enabled=False))
    r = httpx.post(off + "/admin/accounts", json={"id": "x"}, headers=ADMIN, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
