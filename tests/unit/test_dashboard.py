"""The Grafana dashboard and the Prometheus recipe match the series Ember exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "cluster" / "observability"
# Ray exports a Counter `ember_x` as `ember_x_total`, a Histogram as `_bucket`/`_sum`/`_count`.
_SUFFIX = re.compile(r"_(total|bucket|sum|count)$")


def _defined_series() -> set[str]:
    source = (ROOT / "deployments" / "telemetry.py").read_text()
    return set(re.findall(r'(?:Counter|Gauge|Histogram)\("(ember_[a-z_]+)"', source))


def _dashboard_series() -> set[str]:
    dash = json.loads((OBS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return {_SUFFIX.sub("", n) for e in exprs for n in re.findall(r"\bember_[a-z_]+", e)}


def test_every_exported_series_is_on_the_dashboard_and_nothing_else():
    defined = _defined_series()
    assert len(defined) >= 20
    assert _dashboard_series() == defined


def test_prometheus_recipe_scrapes_the_metrics_port_and_strips_rays_prefix():
    cfg = yaml.safe_load((OBS / "prometheus.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8080"]
    (rule,) = job["metric_relabel_configs"]
    # Prometheus anchors the regex at both ends.
    renamed = re.sub("^" + rule["regex"] + "$", rule["replacement"].replace("$1", r"\1"), "ray_ember_requests_total")
    assert renamed == "ember_requests_total"
    assert re.fullmatch(rule["regex"], "ray_serve_num_http_requests_total") is None  # Ray's own stay as they are


def test_dashboard_is_importable_grafana_json():
    dash = json.loads((OBS / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "model"}
    for p in dash["panels"]:
        assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"])
