"""`serve run`, with Ray's metrics on a known port.

    python -m cluster.serve_run ray_configs/local.yaml                 # metrics at 127.0.0.1:8080
    python -m cluster.serve_run ray_configs/sim.yaml --metrics-port 9100

``serve run`` starts a local Ray with ``ray.init()`` and no way to choose the metrics export port,
so Prometheus would have to find a random one. This starts the local Ray first, with
``_metrics_export_port`` (``ray.init``'s documented spelling of ``ray start --metrics-export-port``)
on a private port, serves ``http://127.0.0.1:<port>/metrics`` from it with Ember's series named
``ember_*`` (``cluster.metrics_endpoint``; Ray itself calls them ``ray_ember_*``), then hands over
to ``serve run``, which uses the Ray it finds. With ``--address`` (an existing cluster) nothing is
started here: set the port on that cluster's ``ray start`` and relabel in Prometheus.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_METRICS_PORT = 8080


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.serve_run", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a Serve config file (ray_configs/*.yaml)")
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT)
    p.add_argument("--address", default=None, help="an existing Ray cluster (then no local Ray starts)")
    args, rest = p.parse_known_args(argv)

    import ray
    from ray.serve.scripts import run

    if args.address is None:
        import socket

        from cluster.metrics_endpoint import MetricsEndpoint

        with socket.socket() as s:  # a free loopback port for Ray's own export
            s.bind(("127.0.0.1", 0))
            ray_port = s.getsockname()[1]
        endpoint = MetricsEndpoint(ray_port, args.metrics_port).start()  # fails now if 8080 is taken
        ray.init(namespace="serve", _metrics_export_port=ray_port)
        print(f"Metrics (Ember's as ember_*, Ray's as ray_*): http://127.0.0.1:{endpoint.port}/metrics",
              flush=True)
    else:
        rest += ["--address", args.address]
    run.main([args.config, *rest], prog_name="serve run", standalone_mode=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
