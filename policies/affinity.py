"""Which session a request belongs to, for replica affinity.

The key is chosen in this order: the ``x-session-affinity`` header, the request's
``prompt_cache_key``, the OpenAI ``user`` field, and otherwise a key derived from the start of the
conversation. Every key is scoped by the account, so two accounts never share a session (nor,
with the engine's per-account cache salt, a cached prefix).

A chat's derived key hashes its messages up to and including the first user message. That part
of a conversation never changes from turn to turn, so every turn of a multi-turn chat lands on
the replica holding its history, while different conversations of one account spread out.
Example: turns ``[sys, u1]``, ``[sys, u1, a1, u2]`` and ``[sys, u1, a1, u2, a2, u3]`` all hash
``[sys, u1]``. A plain completion hashes its first ``DERIVED_PREFIX_TOKENS`` token ids.

The account is also the key's placement group (``key_group``): an account's sessions share a few
home replicas, where what they have in common (a system prompt, tool definitions) stays cached.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

DERIVED_PREFIX_TOKENS = 128
_SEP = "\x1f"


def conversation_head(messages: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (role, text) pairs up to and including the first user message."""
    head = []
    for role, text in messages:
        head.append((role, text))
        if role == "user":
            break
    return head


def _digest(parts: Iterable[str]) -> str:
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        h.update(p.encode())
        h.update(_SEP.encode())
    return h.hexdigest()


def session_key(
    account: str,
    *,
    header: str | None = None,
    prompt_cache_key: str | None = None,
    user: str | None = None,
    messages: Iterable[tuple[str, str]] | None = None,
    prompt_ids: Sequence[int] | None = None,
) -> str:
    for source, value in (("header", header), ("cache_key", prompt_cache_key), ("user", user)):
        if value:
            return _SEP.join((account, source, value))
    if messages is not None:
        head = conversation_head(messages)
        derived = _digest(f"{role}:{text}" for role, text in head)
    else:
        derived = _digest(map(str, (prompt_ids or ())[:DERIVED_PREFIX_TOKENS]))
    return _SEP.join((account, "derived", derived))


def continues_session(key: str, roles: Sequence[str] | None = None) -> bool:
    """Whether a request's prefix may already be cached where its ``session_key`` lives, so that
    waiting for its key's owner is worth it: the client named its session (the header,
    ``prompt_cache_key`` or ``user``), or a chat (its messages' ``roles``) has turns after the
    head its derived key hashes. A new conversation's first turn has nothing cached anywhere."""
    if key.split(_SEP, 2)[1:2] != ["derived"]:
        return True
    for i, role in enumerate(roles or ()):
        if role == "user":
            return i + 1 < len(roles)
    return False


def key_group(key: str) -> str:
    """The account a ``session_key`` belongs to (a key from elsewhere is its own group)."""
    return key.split(_SEP, 1)[0]
