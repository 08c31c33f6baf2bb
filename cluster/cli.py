"""`ember`: the admin CLI, a thin client of the admin API.

    ember accounts create acme --tier 2 --monthly-limit 500
    ember accounts show acme
    ember accounts update acme --monthly-limit 1000
    ember keys create acme          # prints the key once
    ember keys list acme
    ember keys revoke key_0123456789abcdef

The server and token come from --url/--admin-token or EMBER_URL/EMBER_ADMIN_TOKEN; an admin API
moved with ``auth.admin_prefix`` needs --admin-prefix or EMBER_ADMIN_PREFIX (default /admin/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import httpx


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ember", description="Ember admin CLI")
    p.add_argument("--url", default=os.environ.get("EMBER_URL", "http://127.0.0.1:8000"))
    p.add_argument("--admin-token", default=os.environ.get("EMBER_ADMIN_TOKEN"))
    p.add_argument("--admin-prefix", default=os.environ.get("EMBER_ADMIN_PREFIX", "/admin/"),
                   help="the admin API's path prefix (auth.admin_prefix in the config)")
    sub = p.add_subparsers(dest="noun", required=True)

    acc = sub.add_parser("accounts").add_subparsers(dest="verb", required=True)
    for verb in ("create", "update"):
        a = acc.add_parser(verb)
        a.add_argument("account")
        a.add_argument("--tier", type=int, choices=range(1, 6), help="spend tier to grant (5 = unlimited)")
        a.add_argument("--monthly-limit", type=float, help="monthly spend limit, USD")
    acc.add_parser("show").add_argument("account")

    keys = sub.add_parser("keys").add_subparsers(dest="verb", required=True)
    keys.add_parser("create").add_argument("account")
    keys.add_parser("list").add_argument("account")
    keys.add_parser("revoke").add_argument("key_id")
    return p


def _request(args) -> tuple[str, str, dict | None]:
    if args.noun == "accounts":
        body = {}
        if getattr(args, "tier", None) is not None:
            body["spend_tier"] = args.tier
        if getattr(args, "monthly_limit", None) is not None:
            body["monthly_spend_limit_usd"] = args.monthly_limit
        if args.verb == "create":
            return "POST", "accounts", {"id": args.account, **body}
        if args.verb == "update":
            return "PATCH", f"accounts/{args.account}", body
        return "GET", f"accounts/{args.account}", None
    if args.verb == "create":
        return "POST", f"accounts/{args.account}/keys", {}
    if args.verb == "list":
        return "GET", f"accounts/{args.account}/keys", None
    return "DELETE", f"keys/{args.key_id}", None


def _prefix(prefix: str) -> str:
    return "/" + prefix.strip("/") + "/"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.admin_token:
        print("error: no admin token (use --admin-token or EMBER_ADMIN_TOKEN)", file=sys.stderr)
        return 2
    method, path, body = _request(args)
    try:
        r = httpx.request(method, args.url.rstrip("/") + _prefix(args.admin_prefix) + path, json=body, timeout=30,
                          headers={"Authorization": f"Bearer {args.admin_token}"})
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    try:
        payload = r.json()
    except ValueError:
        payload = {"error": {"message": r.text}}
    if r.status_code >= 400:
        error = payload.get("error", {}) if isinstance(payload, dict) else {}
        message = error.get("message", payload) if isinstance(error, dict) else payload
        retry = f" (retry after {r.headers['retry-after']} s)" if "retry-after" in r.headers else ""
        print(f"error ({r.status_code}): {message}{retry}", file=sys.stderr)
        return 1
    print(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
