"""Random JSON instances of a JSON Schema: how SimEngine models constrained decoding.

A real engine constrains each token so the text ends up valid; SimEngine draws a valid instance
from the schema at once and streams its text. ``sample(schema, rng)`` supports the keywords that
structured-output backends enforce: ``type`` (one or a list), ``enum``, ``const``, ``anyOf`` /
``oneOf``, ``properties`` / ``required`` / ``additionalProperties``, ``items`` / ``prefixItems``
/ ``minItems`` / ``maxItems``, ``minimum`` / ``maximum`` / ``exclusiveMinimum`` /
``exclusiveMaximum`` / ``multipleOf`` (integers), ``minLength`` / ``maxLength``, local ``$ref``
into ``$defs``. Anything else that restricts values (``pattern``, ``format``, ``allOf``, ``not``,
``if``, ...) raises ``UnsupportedSchema``: SimEngine refuses what it cannot honour.

Example: ``{"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 5}},
"required": ["n"]}`` gives ``{"n": 4}`` (or 3, or 5), and sometimes no optional keys.
"""

from __future__ import annotations

import math
import random
import string
from typing import Any

# Keywords that only describe, or that the sampler reads: everything else is refused.
_READ = {"type", "enum", "const", "anyOf", "oneOf", "properties", "required", "additionalProperties",
         "items", "prefixItems", "minItems", "maxItems", "minimum", "maximum", "exclusiveMinimum",
         "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "$ref", "$defs", "definitions"}
_DESCRIBE = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "strict",
             "deprecated", "readOnly", "writeOnly"}
_LETTERS = string.ascii_letters + string.digits + " "
_MAX_DEPTH = 12
_MAX_SIZE = 1000  # items or characters: past this, no answer fits a context anyway


class UnsupportedSchema(ValueError):
    pass


def check(schema: dict | bool) -> None:
    """Raise ``UnsupportedSchema`` if any subschema, drawn or not, uses a keyword not supported."""
    if not isinstance(schema, dict):
        return
    unknown = set(schema) - _READ - _DESCRIBE
    if unknown:
        raise UnsupportedSchema(f"the keyword(s) {', '.join(sorted(unknown))} are not supported")
    subs = [*schema.get("properties", {}).values(), *schema.get("$defs", {}).values(),
            *schema.get("definitions", {}).values(), *schema.get("anyOf", ()), *schema.get("oneOf", ()),
            *schema.get("prefixItems", ()), schema.get("items", True), schema.get("additionalProperties", True)]
    for sub in subs:
        check(sub)


def sample(schema: dict | bool, rng: random.Random) -> Any:
    return _Sampler(schema if isinstance(schema, dict) else {}, rng).value(schema, 0)


def sample_object(rng: random.Random) -> dict:
    """Any small JSON object (``json_object`` mode)."""
    return {f"k{i}": rng.choice([rng.randint(-99, 99), _word(rng, 1, 8), rng.random() < 0.5, None])
            for i in range(rng.randint(0, 3))}


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi)))


class _Sampler:
    def __init__(self, root: dict, rng: random.Random):
        self.root = root
        self.rng = rng

    def value(self, schema: dict | bool, depth: int) -> Any:
        if schema is True or schema == {}:
            return self.rng.choice([self.rng.randint(0, 9), _word(self.rng, 1, 6), None])
        if schema is False:
            raise UnsupportedSchema("the schema `false` has no instance")
        if depth > _MAX_DEPTH:
            raise UnsupportedSchema(f"the schema nests deeper than {_MAX_DEPTH} levels")
        unknown = set(schema) - _READ - _DESCRIBE
        if unknown:
            raise UnsupportedSchema(f"the keyword(s) {', '.join(sorted(unknown))} are not supported")
        if "$ref" in schema:
            return self.value(self._resolve(schema["$ref"]), depth + 1)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            if not schema["enum"]:
                raise UnsupportedSchema("an empty enum has no instance")
            return self.rng.choice(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.value(self.rng.choice(schema[key]), depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = self.rng.choice(kind)
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
        return getattr(self, "_" + kind)(schema, depth)

    def _resolve(self, ref: str) -> dict:
        parts = ref.split("/")
        if parts[0] != "#":
            raise UnsupportedSchema(f"only local $ref is supported, not {ref!r}")
        node: Any = self.root
        for part in parts[1:]:
            if not isinstance(node, dict) or part not in node:
                raise UnsupportedSchema(f"$ref {ref!r} points nowhere")
            node = node[part]
        return node

    def _object(self, schema: dict, depth: int) -> dict:
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        missing = required - set(props)
        if missing and schema.get("additionalProperties") is False:
            raise UnsupportedSchema(f"required properties {sorted(missing)} are not defined")
        out = {}
        for name, sub in props.items():
            if name in required or self.rng.random() < 0.5:
                out[name] = self.value(sub, depth + 1)
        for name in sorted(missing):
            extra = schema.get("additionalProperties", True)
            out[name] = self.value(extra if isinstance(extra, dict) else True, depth + 1)
        return out

    def _array(self, schema: dict, depth: int) -> list:
        prefix = schema.get("prefixItems", [])
        lo = max(schema.get("minItems", 0), len(prefix))
        hi = schema.get("maxItems", max(lo, 3))
        if hi < lo:
            raise UnsupportedSchema(f"minItems {lo} exceeds maxItems {hi}")
        if lo > _MAX_SIZE:
            raise UnsupportedSchema(f"minItems {lo} is more than {_MAX_SIZE}")
        n = self.rng.randint(lo, min(hi, lo + 3))
        items = schema.get("items", True)
        return [self.value(prefix[i] if i < len(prefix) else items, depth + 1) for i in range(n)]

    def _string(self, schema: dict, depth: int) -> str:
        lo = schema.get("minLength", 0)
        hi = schema.get("maxLength", max(lo, 12))
        if hi < lo:
            raise UnsupportedSchema(f"minLength {lo} exceeds maxLength {hi}")
        if lo > _MAX_SIZE:
            raise UnsupportedSchema(f"minLength {lo} is more than {_MAX_SIZE}")
        return _word(self.rng, lo, min(hi, lo + 12))

    def _integer(self, schema: dict, depth: int) -> int:
        lo, hi = self._bounds(schema, integer=True)
        step = schema.get("multipleOf", 1)
        if not isinstance(step, int) or step <= 0:
            raise UnsupportedSchema("multipleOf must be a positive integer here")
        first, last = -(-lo // step), hi // step
        if first > last:
            raise UnsupportedSchema(f"no multiple of {step} lies in [{lo}, {hi}]")
        return self.rng.randint(first, last) * step

    def _number(self, schema: dict, depth: int) -> float:
        if "multipleOf" in schema:
            raise UnsupportedSchema("multipleOf on numbers is not supported")
        lo, hi = self._bounds(schema, integer=False)
        v = round(self.rng.uniform(lo, hi), 3)
        return v if lo <= v <= hi else lo

    def _bounds(self, schema: dict, integer: bool) -> tuple:
        lo = schema.get("minimum", -1000)
        hi = schema.get("maximum", 1000)
        if "exclusiveMinimum" in schema:
            lo = schema["exclusiveMinimum"] + (1 if integer else 1e-3)
        if "exclusiveMaximum" in schema:
            hi = schema["exclusiveMaximum"] - (1 if integer else 1e-3)
        if "minimum" in schema and "maximum" not in schema and "exclusiveMaximum" not in schema:
            hi = lo + 1000
        if "maximum" in schema and "minimum" not in schema and "exclusiveMinimum" not in schema:
            lo = hi - 1000
        if integer:
            lo, hi = math.ceil(lo), math.floor(hi)
        if lo > hi:
            raise UnsupportedSchema(f"the bounds [{schema.get('minimum')}, {schema.get('maximum')}] hold no value")
        return lo, hi

    def _boolean(self, schema: dict, depth: int) -> bool:
        return self.rng.random() < 0.5

    def _null(self, schema: dict, depth: int) -> None:
        return None

    def __getattr__(self, name: str):
        raise UnsupportedSchema(f"type {name[1:]!r} is not a JSON Schema type")
