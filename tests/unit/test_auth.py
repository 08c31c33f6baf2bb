"""API-key auth and the admin token, on the in-memory store with an injected clock: the failure
throttle, the unknown-key cache, the demo key as an ordinary key, and the admin token's digest."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from pydantic import ValidationError
from starlette.requests import Request

from cluster.config import AuthConfig
from cluster.stores import Stores, hash_key, key_id
from deployments.admin import AdminApi, AdminToken, admin_token_digest
from deployments.auth import ExpiringSet, FailureThrottle, KeyAuth, client_source
from deployments.errors import ApiError


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def request(key: str | None = None, source: str | None = "203.0.113.1", method: str = "GET",
            path: str = "/v1/models", scheme: str = "Bearer") -> Request:
    headers = [(b"authorization", f"{scheme} {key}".encode())] if key is not None else []
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    if source is not None:
        scope["client"] = (source, 51234)
    return Request(scope)


def run(coro):
    return asyncio.run(coro)


def outcome(auth: KeyAuth, key: str, source: str = "203.0.113.1") -> str | int:
    """The account, or the status code of the ApiError."""
    async def go():
        try:
            return await auth.account(request(key, source))
        except ApiError as e:
            return e.status

    return run(go())


def make_auth(clock: FakeClock, demo_key: str | None = None, stores: Stores | None = None, **cfg) -> KeyAuth:
    stores = stores or Stores("memory://")
    return KeyAuth(stores.keys, hash_key(demo_key) if demo_key else None, "demo", config=AuthConfig(**cfg),
                   clock=clock)


def add_key(stores: Stores, account: str, key: str) -> None:
    async def go():
        await stores.accounts.create(account, {"id": account})
        await stores.accounts.add_key(account, hash_key(key))

    run(go())


# -- the failure throttle ---------------------------------------------------------------------

def test_throttle_blocks_a_source_at_the_limit_until_its_oldest_failure_leaves_the_window():
    clock = FakeClock()
    t = FailureThrottle(limit=3, window_s=10, clock=clock)
    for _ in range(3):
        assert t.retry_after("a") is None
        t.failed("a")
        clock.advance(1)
    assert t.retry_after("a") == pytest.approx(7.0)  # the first failure was 3 s ago
    assert t.retry_after("b") is None  # per source
    clock.advance(6.9)
    assert t.retry_after("a") == pytest.approx(0.1)
    clock.advance(0.1)
    assert t.retry_after("a") is None  # one failure left the window: one more attempt allowed
    t.failed("a")
    assert t.retry_after("a") == pytest.approx(1.0)


def test_throttle_memory_is_bounded_and_forgets_the_least_recent_sources():
    clock = FakeClock()
    t = FailureThrottle(limit=2, window_s=60, max_sources=100, clock=clock)
    for i in range(1000):
        t.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(t) == 100
    t.failed("hot")
    t.failed("hot")
    for i in range(99):
        t.failed(f"192.0.2.{i}")
    assert t.retry_after("hot") is not None  # recently failed sources are kept
    clock.advance(60)
    assert t.retry_after("hot") is None and len(t) == 99  # expired logs are dropped when looked at


def test_expiring_set_expires_and_is_bounded():
    clock = FakeClock()
    s = ExpiringSet(ttl_s=2, max_size=3, clock=clock)
    for x in "abcd":
        s.add(x)
    assert "a" not in s and {"b", "c", "d"} == {x for x in "abcd" if x in s}
    clock.advance(2)
    assert "d" not in s and len(s) == 2
    ExpiringSet(ttl_s=0, max_size=3, clock=clock).add("x")  # ttl 0: caches nothing


# -- KeyAuth: failed attempts -----------------------------------------------------------------

def test_unknown_key_is_remembered_briefly_so_a_repeat_costs_no_store_read():
    clock = FakeClock()
    stores = Stores("memory://")
    auth = make_auth(clock, stores=stores, unknown_key_cache_ttl_s=2.0)
    assert outcome(auth, "ember-late") == 401
    add_key(stores, "acme", "ember-late")  # now the store knows it, but the replica does not ask
    assert outcome(auth, "ember-late") == 401
    clock.advance(2.0)
    assert outcome(auth, "ember-late") == "acme"


def test_with_no_unknown_key_cache_every_bad_key_is_read_from_the_store():
    clock = FakeClock()
    stores = Stores("memory://")
    auth = make_auth(clock, stores=stores, unknown_key_cache_ttl_s=0)
    assert outcome(auth, "ember-late") == 401
    add_key(stores, "acme", "ember-late")
    assert outcome(auth, "ember-late") == "acme"


def test_too_many_bad_keys_from_a_source_get_429_with_retry_after_and_no_store_read():
    clock = FakeClock()
    stores = Stores("memory://")
    auth = make_auth(clock, stores=stores, failed_auth_limit=5, failed_auth_window_s=10)
    add_key(stores, "acme", "ember-good")
    for i in range(5):
        assert outcome(auth, f"ember-bad-{i}", "198.51.100.7") == 401
        clock.advance(1)

    async def refused():
        with pytest.raises(ApiError) as e:
            await auth.account(request("ember-good", "198.51.100.7"))  # valid, never verified here
        return e.value

    err = run(refused())
    assert err.status == 429 and err.type == "rate_limit_error" and err.code == "too_many_auth_failures"
    assert err.headers == {"Retry-After": "5"}  # the first failure leaves the window in 5 s
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    assert outcome(auth, "ember-good", "198.51.100.8") == "acme"  # another source is not affected
    clock.advance(5)
    assert outcome(auth, "ember-good", "198.51.100.7") == "acme"


def test_a_missing_key_is_401_and_not_counted_as_a_failure():
    clock = FakeClock()
    auth = make_auth(clock, failed_auth_limit=2)

    async def go():
        for scheme, key in [("Bearer", ""), ("Basic", "abc"), ("Bearer", "   ")] * 3:
            with pytest.raises(ApiError) as e:
                await auth.account(request(key, scheme=scheme))
            assert e.value.status == 401
        with pytest.raises(ApiError) as e:
            await auth.account(request(None))
        assert e.value.status == 401

    run(go())
    assert auth.throttle.retry_after("203.0.113.1") is None


def test_the_source_is_the_client_address_of_the_request():
    assert client_source(request("k", "198.51.100.9")) == "198.51.100.9"
    assert client_source(request("k", None)) == "unknown"
    # Forwarding headers are Serve's proxy's business (FORWARDED_ALLOW_IPS), not ours.
    r = Request({"type": "http", "method": "GET", "path": "/", "client": ("127.0.0.1", 1),
                 "headers": [(b"x-forwarded-for", b"198.51.100.1")]})
    assert client_source(r) == "127.0.0.1"


# -- KeyAuth: the demo key and the cache ------------------------------------------------------

def test_demo_key_is_an_ordinary_key_of_the_demo_account_listed_and_revocable():
    clock = FakeClock()
    stores = Stores("memory://")
    auth = make_auth(clock, "ember-demo-1", stores)
    assert outcome(auth, "ember-demo-1") == "demo"
    digest = hash_key("ember-demo-1")

    async def check():
        assert await stores.accounts.get("demo") is not None
        assert await stores.accounts.keys("demo") == [digest]
        assert await stores.accounts.seeded_keys("demo") == [digest]
        assert await stores.accounts.revoke_key(key_id(digest)) == "demo"

    run(check())
    assert outcome(auth, "ember-demo-1") == 401  # revoked: not cached forever
    # A replica that starts later does not bring it back while the variable still holds it.
    assert outcome(make_auth(clock, "ember-demo-1", stores), "ember-demo-1") == 401
    # A new key in the variable is a new demo key.
    assert outcome(make_auth(clock, "ember-demo-2", stores), "ember-demo-2") == "demo"


def test_verified_keys_are_cached_for_the_ttl_and_no_longer():
    clock = FakeClock()
    stores = Stores("memory://")
    auth = make_auth(clock, "ember-demo-1", stores, key_cache_ttl_s=30)
    assert outcome(auth, "ember-demo-1") == "demo"
    run(stores.keys.put(hash_key("ember-demo-1"), "moved"))  # behind the cache's back
    clock.advance(29.9)
    assert outcome(auth, "ember-demo-1") == "demo"
    clock.advance(0.1)
    assert outcome(auth, "ember-demo-1") == "moved"


def test_a_start_without_the_demo_key_removes_only_the_seeded_key():
    clock = FakeClock()
    stores = Stores("memory://")
    first = make_auth(clock, "ember-demo-1", stores)
    assert outcome(first, "ember-demo-1") == "demo"
    add_key(stores, "demo", "ember-admin-made")
    later = make_auth(clock, None, stores)
    assert outcome(later, "ember-demo-1") == 401
    assert outcome(first, "ember-demo-1") == 401  # the store told the replica that cached it
    assert outcome(later, "ember-admin-made") == "demo"
    assert run(stores.accounts.keys("demo")) == [hash_key("ember-admin-made")]


def test_a_key_removed_and_restored_is_cached_again():
    clock = FakeClock()
    stores = Stores("memory://")
    first = make_auth(clock, "ember-demo-1", stores)
    assert outcome(first, "ember-demo-1") == "demo"
    assert outcome(make_auth(clock, None, stores), "ember-demo-1") == 401  # variable unset: removed
    clock.advance(5)  # past the unknown-key cache
    assert outcome(make_auth(clock, "ember-demo-1", stores), "ember-demo-1") == "demo"  # and set again
    assert outcome(first, "ember-demo-1") == "demo"
    assert hash_key("ember-demo-1") in first._cache


def test_a_demo_key_that_belongs_to_another_account_is_left_alone():
    clock = FakeClock()
    stores = Stores("memory://")
    add_key(stores, "acme", "ember-shared")
    auth = make_auth(clock, "ember-shared", stores)
    assert outcome(auth, "ember-shared") == "acme"
    assert run(stores.accounts.keys("demo")) == []
    assert outcome(make_auth(clock, None, stores), "ember-shared") == "acme"  # not unseeded either


def test_cache_size_is_bounded():
    clock = FakeClock()
    stores = Stores("memory://")
    auth = make_auth(clock, stores=stores, key_cache_size=10)

    async def go():
        for i in range(50):
            await stores.accounts.add_key("acme", hash_key(f"ember-k-{i}"))
            assert await auth.account(request(f"ember-k-{i}")) == "acme"

    run(go())
    assert len(auth._cache) == 10


# -- the admin token and the admin API ----------------------------------------------------------

def test_admin_token_digest_is_salted_and_checks_in_both_formats():
    token = "ember-admin-secret"
    d1, d2 = admin_token_digest(token, iterations=1000), admin_token_digest(token, iterations=1000)
    assert d1 != d2 and hashlib.sha256(token.encode()).hexdigest() not in d1
    for stored in (d1, hashlib.sha256(token.encode()).hexdigest()):
        checker = AdminToken(stored)
        assert run(checker.check(token)) and run(checker.check(token))  # the second from memory
        assert not run(checker.check(token + "x")) and not run(checker.check(""))
        assert not run(checker.check("x" * 5000))


def _admin(clock: FakeClock, token: str = "ember-admin-secret", **cfg) -> AdminApi:
    stores = Stores("memory://")
    auth = KeyAuth(stores.keys, None, "demo", config=AuthConfig(**cfg), clock=clock)
    return AdminApi(stores, None, admin_token_digest(token, iterations=1000), auth.forget, clock=clock)


def _admin_status(api: AdminApi, token: str, source: str, path: str = "accounts/nobody") -> int:
    async def go():
        try:
            return (await api.handle(request(token, source, path="/admin/" + path), path)).status_code
        except ApiError as e:
            return e.status

    return run(go())


def test_failed_admin_tokens_are_throttled_per_source():
    clock = FakeClock()
    api = _admin(clock, admin_failed_limit=3, admin_failed_window_s=60)
    for _ in range(3):
        assert _admin_status(api, "wrong", "198.51.100.20") == 401
    assert _admin_status(api, "ember-admin-secret", "198.51.100.20") == 429  # even the right token
    assert _admin_status(api, "ember-admin-secret", "198.51.100.21") == 404  # authorized: no such account
    clock.advance(60)
    assert _admin_status(api, "ember-admin-secret", "198.51.100.20") == 404


def test_the_demo_account_is_reserved():
    clock = FakeClock()
    api = _admin(clock)

    async def go():
        req = Request({"type": "http", "method": "POST", "path": "/admin/accounts", "client": ("198.51.100.3", 1),
                       "headers": [(b"authorization", b"Bearer ember-admin-secret")]})
        body = b'{"id": "demo"}'

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        req._receive = receive
        with pytest.raises(ApiError) as e:
            await api.handle(req, "accounts")
        return e.value

    err = run(go())
    assert err.status == 409 and err.code == "account_exists" and err.param == "id"


def test_admin_routes_follow_the_configured_prefix_or_do_not_exist():
    clock = FakeClock()
    assert _admin(clock).route("/admin/accounts") is not None
    moved = _admin(clock, admin_prefix="/ops/ember-admin/")
    assert moved.route("/admin/accounts") is None and moved.route("/ops/ember-admin/accounts") is not None
    off = _admin(clock, admin_enabled=False)
    assert off.route("/admin/accounts") is None
    assert _admin_status(off, "ember-admin-secret", "198.51.100.4") == 404


@pytest.mark.parametrize("prefix", ["/admin", "admin/", "/", "/v1/admin/", "/inference/", "/a b/"])
def test_admin_prefix_must_be_a_path_prefix_off_the_api(prefix):
    with pytest.raises(ValidationError):
        AuthConfig(admin_prefix=prefix)


def test_demo_account_must_be_a_valid_account_id():
    with pytest.raises(ValidationError):
        AuthConfig(demo_account="Demo Account")
