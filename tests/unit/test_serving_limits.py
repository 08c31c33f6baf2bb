"""A large chat body's messages are counted before pydantic validates them; whatever that count
cannot read is left to the validation, which says what is wrong (never a 500). Also: which chats
are marked as continuing a session (the router waits for their owner)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from cluster.config import EmberConfig
from deployments.errors import ApiError, to_error
from deployments.serving import LARGE_BODY_BYTES, ChatServing
from tests.conftest import SIM_MODEL, sim_config


@pytest.fixture
def serving() -> ChatServing:
    config = EmberConfig.model_validate(sim_config())
    model = config.model(SIM_MODEL)
    return ChatServing(config, {}, lambda model_id, account: model)  # no tokenizer: nothing gets that far


def _messages(n: int) -> bytes:
    return json.dumps({"model": SIM_MODEL, "messages": [{"role": "user", "content": "x"}] * n}).encode()


def test_a_large_body_with_more_messages_than_the_context_is_refused_before_validation(serving):
    ctx = serving.config.model(SIM_MODEL).context_length
    n = max(ctx, LARGE_BODY_BYTES // 20)  # ~33 bytes a message: a large body
    body = _messages(n)
    assert len(body) >= LARGE_BODY_BYTES
    with pytest.raises(ApiError) as e:
        serving.prepare("r", "acct", body, {})
    err = to_error(e.value)
    assert (err.status, err.code, err.param) == (400, "context_length_exceeded", "messages")
    assert f"{n} messages cannot fit this model's context of {ctx} tokens" in err.message


@pytest.mark.parametrize("body", [b"[" * LARGE_BODY_BYTES, b"{" + b" " * LARGE_BODY_BYTES + b"x",
                                  json.dumps({"model": 7, "messages": [{}] * 20_000}).encode()])
def test_large_bodies_the_count_cannot_read_get_the_validation_error(serving, body):
    with pytest.raises(ValidationError) as e:
        serving.prepare("r", "acct", body, {})
    assert to_error(e.value).status == 400


@pytest.mark.parametrize("messages, headers, extra, returning", [
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], {}, {}, False),  # a new chat
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "x"}],
     {}, {}, True),  # its next turn
    ([{"role": "user", "content": "hi"}], {"x-session-affinity": "s1"}, {}, True),  # a named session
    ([{"role": "user", "content": "hi"}], {}, {"user": "u1"}, True),
])
def test_a_chat_is_marked_returning_when_it_continues_a_session(demo_model_dir, messages, headers, extra, returning):
    from deployments.prompts import PromptBuilder

    config = EmberConfig.model_validate(sim_config())
    model = config.model(SIM_MODEL)
    chat = ChatServing(config, {SIM_MODEL: PromptBuilder(demo_model_dir)}, lambda model_id, account: model)
    body = json.dumps({"model": SIM_MODEL, "messages": messages, "max_tokens": 4, **extra}).encode()
    job = chat.prepare("r", "acct", body, headers)
    assert job.engine_request.returning is returning
