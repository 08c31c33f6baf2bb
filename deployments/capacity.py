"""Live pool capacity inside one process: how many replicas each pool runs right now.

Serve calls a request router's ``update_replicas`` whenever the running replica set of its
deployment changes (a replica joined, was stopped to scale down, or died), in every caller that
holds a ``DeploymentHandle`` to it, within a long-poll round trip of the controller's decision
(well under a second). Ember's routers (``deployments.affinity_router``) publish the new count
here, keyed by (application, deployment); each ``PoolGate`` of the ingress subscribes to its
pool and sizes its slots from it (``PoolGate.set_replicas``).

Threads: Serve runs the handle's router on its own event loop thread by default
(``RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP``, on for handles), not on the ingress's loop. The
registry itself is thread-safe (a lock around two dicts) and calls subscribers on the publishing
thread; a subscriber that owns loop-bound state (the gate's waiters) hands the update to its own
loop with ``call_soon_threadsafe`` (``Subscriber`` below does that).

Before any router reported (the handle is created lazily, on the first request or when the
ingress warms it), nothing is known: the gate keeps its prior from the config.

The ingress's autoscaling metrics (``gate_stats``) are built here too, so the ingress only needs
``record_autoscaling_stats(self): return gate_stats(self.rt.gates)``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Callable, Mapping, Optional

from deployments.autoscaling import ingress_stats
from policies.autoscale import TIERS

log = logging.getLogger("ember.capacity")

Callback = Callable[[int], None]


class CapacityRegistry:
    """Replica counts per (app, deployment), with subscribers; safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        # deployment -> [(app or None for any app, callback)]
        self._subs: dict[str, list[tuple[Optional[str], Callback]]] = {}

    def publish(self, app: str, deployment: str, replicas: int) -> None:
        """Record the running replica count of ``app``/``deployment`` and tell its subscribers
        (on this thread) if it changed."""
        replicas = max(0, int(replicas))
        with self._lock:
            key = (app, deployment)
            if self._counts.get(key) == replicas:
                return
            self._counts[key] = replicas
            subs = [cb for a, cb in self._subs.get(deployment, ()) if a is None or a == app]
        for cb in subs:
            try:
                cb(replicas)
            except Exception:  # one broken subscriber must not stop the others or the router
                log.exception("capacity subscriber failed for %s/%s", app, deployment)

    def get(self, deployment: str, app: Optional[str] = None) -> Optional[int]:
        """The last published count (None if never published). With ``app`` None, any app's."""
        with self._lock:
            if app is not None:
                return self._counts.get((app, deployment))
            for (a, d), n in self._counts.items():
                if d == deployment:
                    return n
        return None

    def subscribe(self, deployment: str, callback: Callback, app: Optional[str] = None) -> Callable[[], None]:
        """Call ``callback(replicas)`` on every change (and now, if a count is known already).
        Returns a function that unsubscribes."""
        entry = (app, callback)
        with self._lock:
            self._subs.setdefault(deployment, []).append(entry)
        known = self.get(deployment, app)
        if known is not None:
            callback(known)

        def unsubscribe() -> None:
            with self._lock:
                subs = self._subs.get(deployment, [])
                if entry in subs:
                    subs.remove(entry)

        return unsubscribe

    def clear(self) -> None:
        """Forget everything (tests)."""
        with self._lock:
            self._counts.clear()
            self._subs.clear()


REGISTRY = CapacityRegistry()


def publish_replicas(deployment_id, replicas: int, registry: Optional[CapacityRegistry] = None) -> None:
    """What a router calls from ``update_replicas``: ``deployment_id`` is Serve's DeploymentID."""
    (registry or REGISTRY).publish(deployment_id.app_name, deployment_id.name, replicas)


class Subscriber:
    """Delivers a registry's updates to ``apply(replicas)`` on the event loop that owns it.

    The loop is the one running when the subscriber was created, or the first one ``bind_loop``
    is called on (the gate calls it on every acquire, which is cheap). An update published on
    that loop's own thread runs at once; from any other thread it is handed over with
    ``call_soon_threadsafe``. Before a loop is known (nothing can wait yet) it runs at once.
    """

    def __init__(self, apply: Callback):
        self._apply = apply
        try:
            self._loop: Optional[asyncio.AbstractEventLoop] = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._loop_thread: Optional[int] = threading.get_ident() if self._loop is not None else None

    def bind_loop(self) -> None:
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
                self._loop_thread = threading.get_ident()
            except RuntimeError:
                pass

    def __call__(self, replicas: int) -> None:
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            self._apply(replicas)
            return
        try:
            loop.call_soon_threadsafe(self._apply, replicas)
        except RuntimeError:  # that loop is closed (the replica is shutting down)
            pass


def current_app_name() -> Optional[str]:
    """The Serve application this process serves, if it is a Serve replica (else None)."""
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:
        return None


def gate_stats(gates: Mapping[str, object]) -> dict[str, float]:
    """The ingress's ``record_autoscaling_stats``: requests each gate holds, per pool and tier
    (``ember_queued::<pool deployment>::<tier>``, zeros included), from ``{model id: PoolGate}``."""
    queued: dict[str, dict[str, float]] = {}
    for gate in gates.values():
        by_tier = gate.queued_by_tier()  # type: ignore[attr-defined]
        queued[gate.deployment] = {t: float(by_tier.get(t, 0)) for t in TIERS}  # type: ignore[attr-defined]
    return ingress_stats(queued)
