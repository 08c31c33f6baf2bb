"""`ember`: the admin CLI, a thin client of the admin API, and `ember batches` for batch jobs.

    ember accounts create acme --tier 2 --monthly-limit 500
    ember accounts show acme
    ember accounts update acme --monthly-limit 1000
    ember keys create acme          # prints the key once
    ember keys list acme
    ember keys revoke key_0123456789abcdef

    ember batches submit requests.jsonl --watch --out results.jsonl
    ember batches watch batch_0123       # a progress bar (tqdm if installed) until it is final
    ember batches download batch_0123 results.jsonl
    ember batches list
    ember batches cancel batch_0123

The server and token come from --url/--admin-token or EMBER_URL/EMBER_ADMIN_TOKEN; an admin API
moved with ``auth.admin_prefix`` needs --admin-prefix or EMBER_ADMIN_PREFIX (default /admin/).
`ember batches` calls the OpenAI API with --api-key or EMBER_API_KEY (it needs the `openai`
package: the `client` extra).
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

    p.add_argument("--api-key", default=os.environ.get("EMBER_API_KEY"), help="for `batches`")
    bat = sub.add_parser("batches", help="batch jobs through the OpenAI Batches API").add_subparsers(
        dest="verb", required=True)
    s = bat.add_parser("submit", help="upload a JSONL file and start a batch")
    s.add_argument("file")
    s.add_argument("--endpoint", default="/v1/chat/completions")
    s.add_argument("--watch", action="store_true", help="then watch it until it is final")
    s.add_argument("--out", help="with --watch: write the results here")
    w = bat.add_parser("watch")
    w.add_argument("batch_id")
    w.add_argument("--out", help="write the results here once it is final")
    d = bat.add_parser("download")
    d.add_argument("batch_id")
    d.add_argument("out")
    bat.add_parser("list")
    bat.add_parser("cancel").add_argument("batch_id")
    return p


def _batches(args) -> int:
    from cluster import batch_client as bc

    if not args.api_key:
        print("error: no API key (use --api-key or EMBER_API_KEY)", file=sys.stderr)
        return 2
    try:
        import openai
    except ImportError:
        print("error: `ember batches` needs the openai package (pip install 'ember[client]')", file=sys.stderr)
        return 2
    client = openai.OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key)
    try:
        if args.verb == "list":
            for b in client.batches.list().data:
                rc = b.request_counts
                print(f"{b.id}  {b.status:<11} {rc.completed + rc.failed if rc else 0}/{rc.total if rc else 0}")
            return 0
        if args.verb == "cancel":
            print(client.batches.cancel(args.batch_id).status)
            return 0
        if args.verb == "submit":
            batch = bc.submit(client, args.file, endpoint=args.endpoint)
            print(batch.id)
            if not args.watch:
                return 0
            batch_id = batch.id
        else:
            batch_id = args.batch_id
        if args.verb == "download":
            batch = client.batches.retrieve(batch_id)
        else:
            batch = bc.watch(client, batch_id, on_update=bc.Progress())
        out = getattr(args, "out", None)
        if out:
            print(f"{bc.download(client, batch, out)} lines written to {out}", file=sys.stderr)
        if batch.status == "failed" and batch.errors:
            for e in batch.errors.data or []:
                print(f"line {e.line}: {e.message}", file=sys.stderr)
        return 0 if batch.status in ("completed", "cancelled") or args.verb == "download" else 1
    except openai.APIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1




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
    if args.noun == "batches":
        return _batches(args)
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
