"""Turns OpenAI messages and prompts into token ids, at the ingress.

The ingress tokenizes (not the replica) because it needs the count before dispatch: to reject a
prompt longer than the context with a 400, to reserve rate-limit budget, and to derive an
affinity key from the leading blocks. It uses the fast ``tokenizers`` library and renders the
model's jinja chat template itself, the way ``transformers`` does, without importing
``transformers`` into every ingress replica.

Callers' text stays text: the template is rendered with a placeholder for each message's content,
the template's own text is tokenized with its special tokens, and each content is tokenized with
special tokens off, so a user who writes ``<|system|>`` sends those characters, not the role token.
(vLLM's OpenAI server renders the template to one string and tokenizes it whole, so there the
same text becomes a control token.)
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

from deployments.openai_api import Message


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class PromptBuilder:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        tok_file = model_dir / "tokenizer.json"
        if not tok_file.exists():
            raise FileNotFoundError(
                f"{tok_file} not found: build the demo model with `python -m cluster.demo_model` "
                "or point the model's `path` at a model directory"
            )
        self._tok = Tokenizer.from_file(str(tok_file))
        self._text_tok = Tokenizer.from_file(str(tok_file))  # special-token strings stay plain text
        self._text_tok.encode_special_tokens = True
        cfg_file = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        template = cfg.get("chat_template")
        jinja_file = model_dir / "chat_template.jinja"
        if template is None and jinja_file.exists():
            template = jinja_file.read_text()
        self._specials = {
            "bos_token": _token_text(cfg.get("bos_token")) or "",
            "eos_token": _token_text(cfg.get("eos_token")) or "",
        }
        self._template = None
        if template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(template)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def chat(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        """Render and tokenize a conversation; ``tools`` are OpenAI tool objects (dicts).

        Callers' strings (contents, tool-call names and arguments, tool-call ids) go through the
        template as placeholders and are tokenized as plain text. Tools reach the template as data;
        a template writes them with ``tojson``, which escapes ``<`` and ``>``, so no special
        token can appear from them either.
        """
        if self._template is None:
            raise ValueError("this model has no chat template; use /v1/completions")
        nonce = secrets.token_hex(4)
        texts: list[str] = []

        def mark(text: str) -> str:
            texts.append(text)
            return f"\ue000{nonce}:{len(texts) - 1}\ue001"

        rendered = self._template.render(
            messages=[_template_message(m, mark) for m in messages],
            tools=tools or None,
            add_generation_prompt=True,
            **self._specials,
        )
        ids: list[int] = []
        pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", rendered)
        # pieces alternate: template text, text index, template text, ...
        for k, piece in enumerate(pieces):
            if k % 2:
                ids += self.text(texts[int(piece)])
            elif piece:
                ids += self._tok.encode(piece, add_special_tokens=False).ids
        return ids

    def text(self, prompt: str) -> list[int]:
        """A caller's text: any special-token string in it is tokenized as plain text."""
        return self._text_tok.encode(prompt, add_special_tokens=False).ids

    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def _template_message(m: Message, mark) -> dict:
    # OpenAI's "developer" role is the newer name for "system".
    out = {"role": "system" if m.role == "developer" else m.role, "content": mark(m.text)}
    if m.tool_calls:
        out["tool_calls"] = [{"id": mark(c.id), "type": "function",
                              "function": {"name": mark(c.function.name), "arguments": mark(c.function.arguments)}}
                             for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = mark(m.tool_call_id)
    return out


def _raise(message: str):
    raise ValueError(message)
