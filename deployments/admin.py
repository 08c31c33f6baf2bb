"""The admin API: accounts, keys, spend tiers and limits, under ``AuthConfig.admin_prefix``
(``/admin/`` by default; ``admin_enabled: false`` removes it).

Guarded by ``Authorization: Bearer <admin token>``; the token comes from the environment when the
app is built (``EMBER_ADMIN_TOKEN``) and only a digest of it is kept: ``admin_token_digest`` (salted
PBKDF2), or a bare SHA-256 from older builders. Tokens are compared as HMACs under a key drawn when
the process starts, in constant time; failed attempts are throttled per source (429 with
Retry-After, see deployments/auth.py for what a source is). Without a token the admin API is off.
New API keys are shown once, in the response that creates them; the store keeps hashes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cluster.config import AuthConfig
from cluster.stores import Stores, hash_key, key_id
from deployments.auth import Clock, FailureThrottle, KeyAuth, client_source, too_many_auth_failures
from deployments.billing import Billing
from deployments.errors import ApiError, bad_request, not_found

ACCOUNT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_ADMIN_BODY = 16 * 1024
MAX_TOKEN_CHARS = 1024
ADMIN_KDF = "pbkdf2_sha256"
ADMIN_KDF_ITERATIONS = 50_000


def admin_token_digest(token: str, iterations: int = ADMIN_KDF_ITERATIONS) -> str:
    """What the builder keeps of the admin token: ``pbkdf2_sha256$<iterations>$<salt>$<digest>``,
    salted, so the deployment's arguments do not hold a plain hash of it."""
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", token.encode(), salt, iterations)
    return f"{ADMIN_KDF}${iterations}${salt.hex()}${digest.hex()}"


class AdminToken:
    """Checks a presented token against the stored digest (``admin_token_digest`` or bare SHA-256).

    Both sides are compared as HMAC-SHA256 under a random per-process key, with
    ``hmac.compare_digest``. The slow KDF runs in a thread, once per distinct token: results are
    remembered by the token's HMAC (bounded), so the right token costs one KDF per process."""

    def __init__(self, stored: str):
        self._key = secrets.token_bytes(32)
        if stored.startswith(ADMIN_KDF + "$"):
            _, iterations, salt, digest = stored.split("$")
            self._kdf: tuple[int, bytes] | None = (int(iterations), bytes.fromhex(salt))
        else:
            self._kdf, digest = None, stored
        self._expected = self._mac(bytes.fromhex(digest))
        self._seen: OrderedDict[bytes, bool] = OrderedDict()

    def _mac(self, data: bytes) -> bytes:
        return hmac.new(self._key, data, hashlib.sha256).digest()

    async def check(self, token: str) -> bool:
        if not token or len(token) > MAX_TOKEN_CHARS:
            return False
        raw = token.encode()
        probe = self._mac(b"seen:" + raw)
        known = self._seen.get(probe)
        if known is not None:
            return known
        if self._kdf is None:
            digest = hashlib.sha256(raw).digest()
        else:
            iterations, salt = self._kdf
            digest = await asyncio.to_thread(hashlib.pbkdf2_hmac, "sha256", raw, salt, iterations)
        ok = hmac.compare_digest(self._mac(digest), self._expected)
        self._seen[probe] = ok
        while len(self._seen) > 256:
            self._seen.popitem(last=False)
        return ok


class NewAccount(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=ACCOUNT_RE.pattern)
    spend_tier: int | None = Field(None, ge=1, le=5)
    monthly_spend_limit_usd: float | None = Field(None, gt=0, allow_inf_nan=False)


class AccountChanges(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spend_tier: int | None = Field(None, ge=1, le=5)
    monthly_spend_limit_usd: float | None = Field(None, gt=0, allow_inf_nan=False)


class AdminApi:
    """``forget_key`` drops a revoked key from the ingress's auth cache; ``auth`` (the ingress's
    KeyAuth, taken from ``forget_key`` when it is its bound ``forget``) seeds the demo account
    before any admin call; ``config`` defaults to that KeyAuth's."""

    def __init__(self, stores: Stores, billing: Billing, token_hash: str | None,
                 forget_key: Callable[[str], None] | None = None, *, config: AuthConfig | None = None,
                 auth: KeyAuth | None = None, clock: Clock = time.monotonic):
        if auth is None and isinstance(getattr(forget_key, "__self__", None), KeyAuth):
            auth = forget_key.__self__  # type: ignore[union-attr]
        self.stores = stores
        self.billing = billing
        self.config = config or (auth.config if auth is not None else AuthConfig())
        self.enabled = self.config.admin_enabled
        self.prefix = self.config.admin_prefix
        self._token = AdminToken(token_hash) if token_hash else None
        self._auth = auth
        self._forget_key = forget_key or (auth.forget if auth is not None else (lambda kid: None))
        self._demo_account = auth.demo_account if auth is not None else self.config.demo_account
        cfg = self.config
        self.throttle = FailureThrottle(cfg.admin_failed_limit, cfg.admin_failed_window_s,
                                        cfg.failed_auth_sources, clock)

    def route(self, path: str):
        """The handler for a request path (under the app's route prefix), if it is an admin path."""
        if not self.enabled or not path.startswith(self.prefix):
            return None
        tail = path[len(self.prefix):]
        return lambda request, rid: self.handle(request, tail)

    async def handle(self, request: Request, path: str) -> Response:
        if not self.enabled:
            raise not_found(f"no route for {request.method} {self.prefix}{path}", code="unknown_url")
        await self._authorize(request)
        if self._auth is not None:
            await self._auth.ready()  # the demo account and key exist before anyone asks
        method, parts = request.method, [p for p in path.split("/") if p]
        body = await request.body() if method in ("POST", "PATCH") else b""
        if len(body) > MAX_ADMIN_BODY:
            raise ApiError(413, "admin request body too large", code="request_too_large")
        match (method, parts):
            case ("POST", ["accounts"]):
                return await self.create_account(NewAccount.model_validate_json(body or b"{}"))
            case ("GET", ["accounts", acct]):
                return JSONResponse(await self._account_body(acct))
            case ("PATCH", ["accounts", acct]):
                return await self.update_account(acct, AccountChanges.model_validate_json(body or b"{}"))
            case ("POST", ["accounts", acct, "keys"]):
                return await self.create_key(acct)
            case ("GET", ["accounts", acct, "keys"]):
                await self._require(acct)
                hashes = await self.stores.accounts.keys(acct)
                seeded = set(await self.stores.accounts.seeded_keys(acct))
                return JSONResponse({"object": "list", "data": [
                    {"id": key_id(h), "env_seeded": h in seeded} for h in hashes]})
            case ("DELETE", ["keys", kid]):
                return await self.revoke_key(kid)
        raise not_found(f"no admin route for {method} {self.prefix}{path}", code="unknown_url")

    async def _authorize(self, request: Request) -> None:
        if self._token is None:
            raise ApiError(403, "the admin API is disabled: set EMBER_ADMIN_TOKEN when starting Ember",
                           type="permission_error", code="admin_disabled")
        source = client_source(request)
        wait = self.throttle.retry_after(source)
        if wait is not None:
            raise too_many_auth_failures(wait, "admin tokens")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not await self._token.check(token.strip()):
            self.throttle.failed(source)
            raise ApiError(401, "invalid admin token", type="authentication_error", code="invalid_admin_token")

    async def _require(self, acct: str) -> dict:
        rec = await self.stores.accounts.get(acct)
        if rec is None:
            raise not_found(f"account `{acct}` does not exist", param="account", code="account_not_found")
        return rec

    async def _account_body(self, acct: str) -> dict:
        rec = await self._require(acct)
        self.billing.forget(acct)
        view = await self.billing.account(acct)
        return {"object": "account", **rec, "effective_spend_tier": view.spend_tier,
                "total_spend_usd": round(view.total_usd, 6), "month_spend_usd": round(view.month_usd, 6)}

    async def create_account(self, new: NewAccount) -> Response:
        rec = {"id": new.id, "spend_tier": new.spend_tier, "monthly_spend_limit_usd": new.monthly_spend_limit_usd,
               "created": int(time.time())}
        # The demo account is reserved: it exists from the first start, key or not.
        if new.id == self._demo_account or not await self.stores.accounts.create(new.id, rec):
            raise ApiError(409, f"account `{new.id}` already exists", param="id", code="account_exists")
        return JSONResponse(await self._account_body(new.id), status_code=201)

    async def update_account(self, acct: str, changes: AccountChanges) -> Response:
        await self._require(acct)
        await self.stores.accounts.update(acct, changes.model_dump(exclude_unset=True))
        return JSONResponse(await self._account_body(acct))

    async def create_key(self, acct: str) -> Response:
        await self._require(acct)
        key = "ember-" + secrets.token_urlsafe(32)
        digest = hash_key(key)
        await self.stores.accounts.add_key(acct, digest)
        return JSONResponse({"object": "api_key", "id": key_id(digest), "account": acct, "key": key,
                             "note": "store this key now: it is not shown again"}, status_code=201)

    async def revoke_key(self, kid: str) -> Response:
        if not kid.startswith("key_"):
            raise bad_request("key ids look like key_<16 hex digits>", param="key_id")
        acct = await self.stores.accounts.revoke_key(kid)
        if acct is None:
            raise not_found(f"key `{kid}` does not exist", code="key_not_found")
        self._forget_key(kid)
        return JSONResponse({"object": "api_key", "id": kid, "revoked": True})
