# fedjob: two commands do all the set-up.
#   make quickstart   install, build a tiny model and non-IID data, run a real federated job
#   make test         install, lint, run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedjob-installed
CACHE ?= $(or $(FEDJOB_CACHE),$(HOME)/.cache/fedjob)
export TORCH_EXTENSIONS_DIR ?= $(CACHE)/torch_extensions
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install quickstart chat-example test lint protos crds clean bench test-cluster test-cluster-down

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: a bare torch requirement would pull CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# DeepSpeed compiles its CPU communication op on first use (~25-75 s); do it once, cached.
	$(PY) -m fedjob_cli.main warmup
	touch $@

quickstart: $(STAMP)
	$(PY) -m fedjob_cli.main example --out examples --which text
	$(VENV)/bin/fedjob run examples/quickstart.yaml --out runs/quickstart

# The second example: LoRA on three silos' chat data with the model's own tokenizer and chat template.
chat-example: $(STAMP)
	$(PY) -m fedjob_cli.main example --out examples --which chat
	$(VENV)/bin/fedjob run examples/chat-lora.yaml --out runs/chat-lora

test: $(STAMP) lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. protos/fedjob/v1/fedjob.proto

test-cluster:
	hack/test-cluster.sh up

test-cluster-down:
	hack/test-cluster.sh down

crds: $(STAMP)
	$(VENV)/bin/fedjob crd --out crds/federatedjob.yaml
	$(VENV)/bin/fedjob crd --kind FederatedSilo --out crds/federatedsilo.yaml
	cp crds/federatedjob.yaml crds/federatedsilo.yaml helm/fedjob/crds/

bench: $(STAMP)
	$(PY) bench/compression.py
	$(PY) bench/scale.py
	$(PY) bench/scale.py --lora 1.1B 6.7B
	$(PY) bench/poisoning.py
	$(PY) bench/communication.py

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
