"""The cluster manifests validate against what reads them: Ray's cluster-launcher schema, KubeRay's
RayService CRD (a vendored subset, tests/kuberay_schema), Serve's deploy schema for the embedded
Serve config, and Ember's own config for the app's args. Nothing here touches a network."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.config import EmberConfig

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "cluster" / "manifests"
CRD_SUBSET = ROOT / "tests" / "kuberay_schema" / "rayservice-v1-subset.json"
PROXY_GUARD = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.proxy_guard:middlewares"


def _launcher() -> dict:
    return yaml.safe_load((MANIFESTS / "ray-cluster.yaml").read_text())


def _k8s_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all((MANIFESTS / "rayservice.yaml").read_text()) if d]


def _rayservice() -> dict:
    (svc,) = [d for d in _k8s_docs() if d["kind"] == "RayService"]
    return svc


def _crd_validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(CRD_SUBSET.read_text()))


def _containers(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


# -- the cluster launcher ---------------------------------------------------------------------

def test_launcher_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_launcher()))


def test_launcher_has_a_head_and_cpu_and_gpu_workers():
    cfg = _launcher()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    assert any(t["resources"].get("GPU", 0) == 0 for t in workers.values())
    assert all(t["max_workers"] >= t["min_workers"] for t in workers.values())


def test_launcher_gpu_nodes_fit_a_pool_replica_of_the_gpu_config():
    types = _launcher()["available_node_types"]
    gpu_nodes = [t["resources"] for t in types.values() if t["resources"].get("GPU")]
    serve = yaml.safe_load((ROOT / "ray_configs" / "gpu.yaml").read_text())
    for app in serve["applications"]:
        for m in EmberConfig.model_validate(app["args"]).models:
            r = m.resources
            assert any(n["GPU"] >= r.num_gpus and n["CPU"] >= r.num_cpus for n in gpu_nodes), m.id


def test_every_launcher_node_starts_ray_with_the_proxy_guard_and_metrics_port():
    cfg = _launcher()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in cfg[key] if "ray start" in c]
        assert PROXY_GUARD in start
        assert "--metrics-export-port=8080" in start
    (head,) = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    assert "--port=6379" not in head  # Redis listens there


# -- KubeRay ----------------------------------------------------------------------------------

def test_rayservice_validates_against_the_kuberay_crd_fields():
    _crd_validator().validate(_rayservice())


@pytest.mark.parametrize("path, bad", [
    (("spec", "rayClusterConfig"), {"workerGroupSpec": []}),   # misspelt: the API server would drop it
    (("spec", "rayClusterConfig", "headGroupSpec"), {"rayStartParam": {}}),
    (("spec",), {"serveConfigV2": {"applications": []}}),      # must be a YAML string, not a map
])
def test_the_crd_subset_rejects_a_misspelt_or_mistyped_field(path, bad):
    doc = copy.deepcopy(_rayservice())
    node = doc
    for key in path:
        node = node[key]
    node.update(bad)
    with pytest.raises(jsonschema.ValidationError):
        _crd_validator().validate(doc)


def test_the_crd_subset_requires_a_worker_groups_name_and_bounds():
    doc = copy.deepcopy(_rayservice())
    del doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError, match="groupName"):
        _crd_validator().validate(doc)


def test_embedded_serve_config_validates_with_serve_and_ember():
    serve_cfg = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == "cluster.builder:build_app"
    config = EmberConfig.model_validate(app["args"])
    assert config.store.url.startswith("redis://")  # several ingress replicas share the store


def test_the_store_is_the_redis_the_manifest_deploys():
    docs = _k8s_docs()
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    app = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])["applications"][0]
    url = EmberConfig.model_validate(app["args"]).store.url
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    assert host in services
    assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    (redis,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == host]
    assert redis["spec"]["selector"]["matchLabels"] == services[host]["spec"]["selector"]


def test_every_ray_pod_has_the_proxy_guard_and_exports_metrics_on_8080():
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    name, value = PROXY_GUARD.split("=")
    for c in _containers(cluster):
        assert {"name": name, "value": value} in c["env"], c["name"]
        assert 8080 in {p["containerPort"] for p in c["ports"]}, c["name"]
    for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert g["rayStartParams"]["metrics-export-port"] == "8080"


def test_gpu_pool_replicas_fit_the_gpu_worker_group():
    spec = _rayservice()["spec"]
    app = yaml.safe_load(spec["serveConfigV2"])["applications"][0]
    config = EmberConfig.model_validate(app["args"])
    gpu_limits = [c["resources"]["limits"] for g in spec["rayClusterConfig"]["workerGroupSpecs"]
                  for c in g["template"]["spec"]["containers"] if "nvidia.com/gpu" in c["resources"]["limits"]]
    assert gpu_limits
    for m in config.models:
        assert any(int(lim["nvidia.com/gpu"]) >= m.resources.num_gpus and int(lim["cpu"]) >= m.resources.num_cpus
                   for lim in gpu_limits), m.id
