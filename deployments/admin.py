"""The admin API under ``/admin/``: accounts, keys, spend tiers and limits.

Guarded by ``Authorization: Bearer <admin token>``; the token comes from the environment when the
app is built (``EMBER_ADMIN_TOKEN``) and only its hash is kept. Without a token the admin API is
off. New API keys are shown once, in the response that creates them; the store keeps hashes.
"""

from __future__ import annotations

import hmac
import re
import secrets
import time

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cluster.stores import Stores, hash_key, key_id
from deployments.billing import Billing
from deployments.errors import ApiError, bad_request, not_found

ACCOUNT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_ADMIN_BODY = 16 * 1024


class NewAccount(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=ACCOUNT_RE.pattern)
    spend_tier: int | None = Field(None, ge=1, le=5)
    monthly_spend_limit_usd: float | None = Field(None, gt=0)


class AccountChanges(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spend_tier: int | None = Field(None, ge=1, le=5)
    monthly_spend_limit_usd: float | None = Field(None, gt=0)


class AdminApi:
    def __init__(self, stores: Stores, billing: Billing, token_hash: str | None, forget_key):
        self.stores = stores
        self.billing = billing
        self._token_hash = token_hash
        self._forget_key = forget_key  # drops a revoked key from the ingress's auth cache

    async def handle(self, request: Request, path: str) -> Response:
        self._authorize(request)
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
                return JSONResponse({"object": "list", "data": [{"id": key_id(h)} for h in hashes]})
            case ("DELETE", ["keys", kid]):
                return await self.revoke_key(kid)
        raise not_found(f"no admin route for {method} /admin/{path}", code="unknown_url")

    def _authorize(self, request: Request) -> None:
        if self._token_hash is None:
            raise ApiError(403, "the admin API is disabled: set EMBER_ADMIN_TOKEN when starting Ember",
                           type="permission_error", code="admin_disabled")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(hash_key(token.strip()), self._token_hash):
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
        if not await self.stores.accounts.create(new.id, rec):
            raise ApiError(409, f"account `{new.id}` already exists", code="account_exists")
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
