"""Composition: validate the config once, then bind the deployments.

``ray_configs/*.yaml`` point at ``cluster.builder:build_app`` with the config as ``args``.

Autoscaling (deployments/autoscaling.py): a pool whose config has ``autoscaling`` with
``policy: ember`` gets ``pool_autoscaling_config`` (Serve's delays 0, metrics every second,
``EmberPoolPolicy`` as its deployment-level policy, so plain ``serve.run`` scales it on Ember's
metrics) and reports them from ``ModelPool.record_autoscaling_stats``. The ingress then gets an
``autoscaling_config`` too (min = max = its replica count when it is fixed), since only an
autoscaled deployment's ``record_autoscaling_stats`` reaches the controller: its gate queues per
pool and tier feed ``EmberAppPolicy`` when the app is started from a config file that names it
(``autoscaling_policy:`` on the application, as ``ray_configs/sim.yaml`` does).

Pools drain on scale-down: ``graceful_shutdown_timeout_s`` is the model's, else the ingress's
``request_timeout_s`` (a stopping replica leaves as soon as its last stream ends; the bound only
matters for streams that run longer).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, AsyncIterator

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.blobs import BlobStore
from cluster.config import (
    AutoscalingConfig,
    EmberConfig,
    EngineConfig,
    ModelConfig,
    ObservabilityConfig,
    RoutingConfig,
)
from cluster.stores import Stores, hash_key
from deployments.autoscaling import ingress_autoscaling_config, pool_autoscaling_config
from deployments.batch_runner import BatchRunner, HandleExecutor
from deployments.capacity import gate_stats
from deployments.admin import admin_token_digest
from deployments.ingress import Ingress
from deployments.engines.protocol import EngineOutput, EngineRequest
from deployments.model_pool import ModelPool
from deployments.telemetry import PoolTelemetry

log = logging.getLogger("ember.builder")

# vLLM in a Serve replica: an in-process engine core (separate processes pin cores
# and cost 40% throughput here) and never a model hub.
_ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class ServedModelPool(ModelPool):
    async def __init__(self, model: ModelConfig,  # type: ignore[misc]  # Serve awaits async inits
                       observability: ObservabilityConfig | None = None):
        ModelPool.__init__(self, model, replica_tag=serve.get_replica_context().replica_id.unique_id)
        await self.start()
        self.telemetry = PoolTelemetry(model, observability or ObservabilityConfig(), self.replica_tag)
        self._sampler = asyncio.get_running_loop().create_task(self.telemetry.sample_forever(self.load))
        if self.telemetry.tracer is None:
            # Untraced: Serve calls the plain stream, without the tracing layer below.
            self.generate_stream = ModelPool.generate_stream.__get__(self)  # type: ignore[method-assign]

    async def generate_stream(self, request: EngineRequest,
                              interval_s: float | None = None) -> AsyncIterator[EngineOutput]:
        stream = ModelPool.generate_stream(self, request, interval_s)
        if request.trace_context is not None:
            stream = self.telemetry.traced(request, stream)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()  # the engine aborts at once when the caller goes

    async def __del__(self):
        await self.shutdown()


class ServedIngress(Ingress):
    async def __init__(self, *args, **kwargs):  # type: ignore[misc]  # Serve awaits async inits
        Ingress.__init__(self, *args, **kwargs)
        # Deliver what a crashed replica left in this node's usage outbox, traffic or not.
        self.rt.billing.start()
        self._sampler = asyncio.get_running_loop().create_task(
            self.rt.telemetry.sample_forever(self.rt.gates, self.rt.billing))
        # memory://: the batch runner shares this replica's store, so it runs here (there is
        # only one ingress replica then).
        if self.batch is not None and self.batch_runner is None:
            self.local_runner = BatchRunner(self.config.batch, self.stores.batches, self.batch.blobs, self)
            self.local_runner.start()
        # Start each pool handle's router now, not on the first request: it reports the pool's
        # running replicas to the gates (deployments.capacity) from the start.
        for handle in self.rt.pools.values():
            try:
                if not handle.is_initialized:
                    handle._init()
            except Exception:  # a handle that cannot start early starts on its first request
                log.warning("could not start the router of %s early", handle, exc_info=True)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Requests held at each gate, per pool and tier (deployments/autoscaling.py)."""
        return gate_stats(self.rt.gates)


class ServedBatchRunner:
    """The batch runner as a one-replica Serve deployment (shared stores only): Serve replaces it
    when it dies, and the new one resumes from the store. It runs lines through the app's ingress."""

    async def __init__(self, config: EmberConfig):  # type: ignore[misc]  # Serve awaits async inits
        app = serve.get_replica_context().app_name
        executor = HandleExecutor(serve.get_deployment_handle("ingress", app))
        stores = Stores(config.store.url)
        self.runner = BatchRunner(config.batch, stores.batches, BlobStore(config.batch.blob_url), executor)
        self.runner.start()

    async def kick(self) -> None:
        self.runner.kick()

    async def __del__(self):
        await self.runner.stop()


def _scaling(num_replicas: int | None, autoscaling: AutoscalingConfig | None) -> dict[str, Any]:
    if autoscaling is None:
        return {"num_replicas": num_replicas or 1}
    if autoscaling.policy == "ember":
        return {"autoscaling_config": pool_autoscaling_config(
            autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.initial_replicas,
            metrics_interval_s=autoscaling.metrics_interval_s,
            look_back_period_s=autoscaling.look_back_period_s, policy_kwargs=autoscaling.knobs())}
    return {"autoscaling_config": autoscaling.to_serve()}


def _ingress_scaling(config: EmberConfig) -> dict[str, Any]:
    ing = config.ingress
    if ing.autoscaling is not None:
        cfg = {**ing.autoscaling.to_serve(), "metrics_interval_s": ing.autoscaling.metrics_interval_s,
               "look_back_period_s": ing.autoscaling.look_back_period_s}
        return {"autoscaling_config": cfg}
    if any(m.served and m.autoscaling is not None and m.autoscaling.policy == "ember" for m in config.models):
        n = ing.num_replicas or 1  # a fixed size, but autoscaled so that its metrics are pushed
        return {"autoscaling_config": ingress_autoscaling_config(n, n)}
    return {"num_replicas": ing.num_replicas or 1}


def _logging(config: EmberConfig) -> dict[str, Any]:
    return {"enable_access_log": config.ingress.access_log}


_ROUTERS = {
    "affinity": "deployments.affinity_router.AffinityRouter",
    "round_robin": "deployments.affinity_router.RoundRobinRouter",
    "ray_consistent_hash": "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",
}


def _router(routing: RoutingConfig, replica_slots: int, metrics: bool = True) -> dict[str, Any]:
    if routing.policy == "power_of_two":  # Serve's default, publishing the live replica count
        return {"request_router_config": RequestRouterConfig(
            request_router_class="deployments.affinity_router.PowerOfTwoRouter")}
    kwargs: dict[str, Any] = {"vnodes": routing.vnodes, "load_factor": routing.load_factor,
                              "replica_slots": replica_slots, "peer_load_ttl_s": routing.peer_load_ttl_s,
                              "account_replicas": routing.account_replicas,
                              "owner_wait_s": routing.owner_wait_ms / 1000, "metrics": metrics}
    if routing.policy == "ray_consistent_hash":
        kwargs = {"num_virtual_nodes": routing.vnodes}
    elif routing.policy == "round_robin":
        kwargs = {}
    return {"request_router_config": RequestRouterConfig(
        request_router_class=_ROUTERS[routing.policy], request_router_kwargs=kwargs)}


def engine_env(engine: EngineConfig) -> dict[str, str]:
    """The environment of a pool replica's engine (the KV cache size goes as an engine argument)."""
    env = dict(_ENGINE_ENV)
    if engine.kind == "vllm" and engine.cpu_threads:
        env["OMP_NUM_THREADS"] = str(engine.cpu_threads)
        # Sleep rather than spin between kernels: the replica shares its cores with Serve.
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        env["KMP_BLOCKTIME"] = "0"
    return env


def pool_shutdown_timeout_s(model: ModelConfig, config: EmberConfig) -> float:
    """How long a stopping pool replica may finish its streams: the model's own setting, else
    the ingress's request_timeout_s (never below Serve's 20 s default)."""
    if model.graceful_shutdown_timeout_s is not None:
        return model.graceful_shutdown_timeout_s
    return max(20.0, config.ingress.request_timeout_s)


def pool_deployment(model: ModelConfig, config: EmberConfig):
    if config.ingress.queue_order != "vtc":  # only fair-share order hands out the headroom
        model = model.model_copy(update={"engine": model.engine.model_copy(update={"fair_share_headroom": 0.0})})
    env = engine_env(model.engine)
    return serve.deployment(ServedModelPool).options(
        name=model.deployment_name,
        max_ongoing_requests=model.max_ongoing_requests,
        ray_actor_options={**model.resources.to_serve(), "runtime_env": {"env_vars": env}},
        # Cheap (the engine says whether it is alive): a dead engine is replaced within seconds.
        health_check_period_s=2,
        # Scale-down drains: the replica serves its streams to the end (see the module doc).
        graceful_shutdown_timeout_s=pool_shutdown_timeout_s(model, config),
        logging_config=_logging(config),
        # What each engine really runs (its fair-share headroom included), so the router never
        # queues a request in one engine while another has room.
        **_router(model.routing, model.engine.engine_max_num_seqs, config.observability.metrics.enabled),
        **_scaling(model.num_replicas, model.autoscaling),
    ).bind(model, config.observability)


def ensure_models(config: EmberConfig) -> None:
    """Build the demo model for any model that uses it and lacks it. Other paths must exist."""
    for m in config.models:
        if not m.served:
            continue
        if m.path is None and not (m.model_dir / "tokenizer.json").exists():
            from cluster.demo_model import build_demo_model

            kind = "embed" if m.task == "embed" else "chat"
            log.warning("building the demo %s model in %s", kind, m.model_dir)
            build_demo_model(m.model_dir, kind=kind)
        elif not m.model_dir.exists():
            raise FileNotFoundError(f"model {m.id}: directory {m.model_dir} does not exist")


def build_app(args: dict | EmberConfig) -> Application:
    config = args if isinstance(args, EmberConfig) else EmberConfig.model_validate(args)
    ensure_models(config)
    demo_key = os.environ.get(config.auth.demo_key_env)
    demo_hash = hash_key(demo_key) if demo_key else None
    admin_token = os.environ.get(config.auth.admin_token_env)
    admin_hash = admin_token_digest(admin_token) if admin_token else None
    if config.store.url == "memory://" and (config.ingress.num_replicas or 2) > 1:
        log.warning("store memory:// is per ingress replica: accounts, keys and the ledger are not shared "
                    "between %s ingress replicas; use redis:// for more than one", config.ingress.num_replicas
                    or "autoscaled")
    pools = {m.id: pool_deployment(m, config) for m in config.models if m.served}
    ing = config.ingress
    runner = None
    if config.batch.enabled and config.store.url != "memory://":
        runner = serve.deployment(ServedBatchRunner).options(
            name="batch-runner", num_replicas=1, max_ongoing_requests=64, health_check_period_s=2,
            ray_actor_options={"num_cpus": 0}, logging_config=_logging(config)).bind(config)
    return serve.deployment(ServedIngress).options(
        name="ingress",
        max_ongoing_requests=ing.max_ongoing_requests,
        ray_actor_options={"num_cpus": ing.num_cpus, "runtime_env": {"env_vars": {
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}},
        logging_config=_logging(config),
        **_ingress_scaling(config),
    ).bind(config, pools, demo_hash, admin_hash, runner)
