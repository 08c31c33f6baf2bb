"""Session keys: precedence, account scoping, and stickiness across the turns of a chat."""

from __future__ import annotations

from policies.affinity import key_group, session_key


def test_precedence_header_then_cache_key_then_user_then_derived():
    msgs = [("user", "hi")]
    full = dict(header="h1", prompt_cache_key="p1", user="u1", messages=msgs)
    assert session_key("acct", **full).endswith("header\x1fh1")
    assert session_key("acct", **{**full, "header": None}).endswith("cache_key\x1fp1")
    assert session_key("acct", **{**full, "header": None, "prompt_cache_key": None}).endswith("user\x1fu1")
    assert "\x1fderived\x1f" in session_key("acct", messages=msgs)


def test_keys_are_scoped_by_account():
    assert session_key("a", header="same") != session_key("b", header="same")
    assert session_key("a", messages=[("user", "x")]) != session_key("b", messages=[("user", "x")])


def test_every_turn_of_a_chat_shares_the_derived_key_and_other_chats_do_not():
    sys_ = ("system", "You are terse.")
    turns = [
        [sys_, ("user", "q1")],
        [sys_, ("user", "q1"), ("assistant", "a1"), ("user", "q2")],
        [sys_, ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"), ("user", "q3")],
    ]
    keys = {session_key("acct", messages=t) for t in turns}
    assert len(keys) == 1
    assert session_key("acct", messages=[sys_, ("user", "another question")]) not in keys


def test_completion_prompts_derive_from_their_leading_tokens():
    a = list(range(500))
    assert session_key("acct", prompt_ids=a) == session_key("acct", prompt_ids=a[:200] + [7] * 50)
    assert session_key("acct", prompt_ids=a) != session_key("acct", prompt_ids=[1] + a[1:])


def test_a_keys_group_is_its_account_whatever_its_source():
    assert {key_group(session_key("acct-1", header="h")), key_group(session_key("acct-1", user="u")),
            key_group(session_key("acct-1", messages=[("user", "x")]))} == {"acct-1"}
    assert key_group(session_key("acct-2", header="h")) == "acct-2"
    assert key_group("no-separator") == "no-separator"


def test_a_request_continues_a_session_when_it_names_one_or_has_turns_after_its_head():
    from policies.affinity import continues_session

    derived, named = session_key("acct", messages=[("user", "hi")]), session_key("acct", user="u1")
    assert not continues_session(derived, ["system", "user"])  # a new conversation: nothing cached
    assert not continues_session(derived, ["user"])
    assert not continues_session(derived)  # a plain completion with a derived key
    assert continues_session(derived, ["system", "user", "assistant", "user"])  # its second turn
    assert continues_session(derived, ["user", "assistant"])
    assert continues_session(named, ["user"])  # a named session (header, prompt_cache_key, user)
    assert not continues_session(derived, ["system", "assistant"])  # no user message: the whole is the head
