# tts-sentinel — the two commands a person needs are `make run` and `make test`.
# Both set up everything they need on a fresh machine (venv, pip packages, Debian packages).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# The CPU build of torch that this machine keeps on disk; elsewhere pip takes it from the index
# with the CPU wheel index so that no CUDA wheels are pulled in.
TORCH_WHEEL ?= $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl))
# What the demo starts; the tests and benchmarks also run the others for real.
DEMO_DEBS   := prometheus prometheus-alertmanager
DEBIAN_PKGS := $(DEMO_DEBS) mtail wrk nginx redis-server
# apt-get install, as root (through sudo when not root); the packages follow it.
APT_INSTALL = SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends

.PHONY: run test bench lint venv deps debs node clean cpu-torchaudio compiler

GRAFANA_CHECK := grafana/check

# One venv in two stages. The first holds what the demo runs (`make run`: the app's espeak
# backend, no torch), so the demo does not wait for gigabytes it never loads; the second adds
# what the tests need on top (torch, ChatTTS, the dev tools), reusing the first.
$(VENV)/.installed-run: pyproject.toml | python-venv
	@echo "make: setting up $(VENV) with what the demo runs (aiohttp, espeak-ng; no torch): once, about 20 s"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[app]'
	touch $@

# The C scanner (exporter/analyze/_scan.c) is compiled by the editable install: rebuild on change.
$(VENV)/.installed: $(VENV)/.installed-run pyproject.toml exporter/analyze/_scan.c | compiler
	@echo "make: adding torch, ChatTTS and the test tools to $(VENV): a few minutes, once"
	$(PIP) install --upgrade pip
	@if [ -n "$(TORCH_WHEEL)" ]; then $(PIP) install "$(TORCH_WHEEL)"; \
	 else $(PIP) install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu || $(PIP) install torch==2.13.0; fi
	$(PIP) install -e '.[dev,app,chattts]'
	@$(MAKE) --no-print-directory cpu-torchaudio
	$(PY) -c "import ChatTTS"
	$(PY) -c "import exporter.analyze._scan"   # optional to pip (see pyproject), not to us
	touch $@

# ChatTTS imports torchaudio, whose PyPI wheels are CUDA builds: next to a CPU-only torch their
# compiled extension cannot load and `import torchaudio` fails. torchaudio runs as pure Python
# when its libraries are absent (its loader's documented pex case), and ChatTTS uses only its
# pure-Python MelSpectrogram, so on such a machine the libraries are moved aside, not deleted.
cpu-torchaudio:
	@if ! $(PY) -c "import torchaudio" >/dev/null 2>&1 && \
	    $(PY) -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then \
	  lib=$$($(PY) -c "import importlib.util, pathlib; \
	    print(pathlib.Path(importlib.util.find_spec('torchaudio').origin).parent / 'lib')"); \
	  mkdir -p "$$lib/cuda-only" && mv "$$lib"/*.so "$$lib/cuda-only/"; \
	  echo "torchaudio: CUDA build beside a CPU-only torch; its libraries moved to $$lib/cuda-only"; \
	fi

venv: $(VENV)/.installed

# `python3 -m venv` needs ensurepip, which Debian ships apart (python3-venv).
.PHONY: python-venv
python-venv:
	@if ! $(PYTHON) -c "import ensurepip" 2>/dev/null; then \
	  echo "make: installing python3-venv (python3 -m venv needs it)"; \
	  $(APT_INSTALL) python3-venv >/dev/null; \
	fi

# analyze's scanner is C: the install needs a compiler and the headers of $(PYTHON) (Debian's
# python3-dev has those of its python3; another $(PYTHON) brings its own, as pyenv's do).
compiler:
	@if ! command -v cc >/dev/null || ! $(PYTHON) -c "import os, sys, sysconfig; \
	    sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))"; then \
	  $(APT_INSTALL) gcc libc6-dev python3-dev >/dev/null; \
	fi

deps: venv debs $(GRAFANA_CHECK)/node_modules/.package-lock.json

# Node.js runs the dashboards' type-check against @grafana/schema (no Grafana server is needed).
# Checks for the commands, not the Debian package: NodeSource's nodejs ships npm itself.
node:
	@if ! command -v node >/dev/null || ! command -v npm >/dev/null; then \
	  $(APT_INSTALL) nodejs npm >/dev/null; \
	fi

$(GRAFANA_CHECK)/node_modules/.package-lock.json: $(GRAFANA_CHECK)/package.json $(GRAFANA_CHECK)/package-lock.json | node
	cd $(GRAFANA_CHECK) && npm ci --no-audit --no-fund

# Debian packages run for real (installed once, as root). Debian starts their services on
# install; they are stopped again, since the stack starts its own on free ports.
install_debs = missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "make: installing Debian packages:$$missing"; \
	  $(APT_INSTALL) $$missing >/dev/null; \
	  $$SUDO systemctl stop prometheus prometheus-alertmanager nginx mtail >/dev/null 2>&1 || true; \
	fi

# All that the end-to-end tests and benchmarks run.
debs:
	@$(call install_debs,$(DEBIAN_PKGS))

# What the demo runs.
.PHONY: demo-debs
demo-debs:
	@$(call install_debs,$(DEMO_DEBS))

test: deps
	TTS_REQUIRE_CHATTTS=1 $(PY) -m pytest -q

# The demo: app + sidecar on the embedded espeak backend, Prometheus and Alertmanager on loopback,
# live traffic; prints where to look and runs until Ctrl-C, SIGTERM or SIGHUP, then stops them
# all. It installs only what it runs: no torch, ChatTTS or Node.js (`make test` adds those).
run: $(VENV)/.installed-run demo-debs
	$(PY) -m tests.support.local_stack

bench: deps
	@for b in tests/bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# The inner loop: the fast tests, no external servers (`make test` runs them all).
.PHONY: check
check: venv
	$(PY) -m pytest -q -m "not slow and not external"

# Locust against the local stack (app + sidecar): hits, misses, jobs, bad requests; a response
# is a success only as a valid, plausible, non-silent WAV. Fails when any response failed.
.PHONY: load
load: deps
	$(PY) tests/load/run_load.py $(LOAD_ARGS)

lint: venv
	$(VENV)/bin/ruff check exporter tts_app tests config
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(GRAFANA_CHECK)/node_modules $(GRAFANA_CHECK)/build

# The one-shot check on a machine with an NVIDIA GPU (tests/gpu/check.py): NVML against
# nvidia-smi, the gate's crossing latency, chattts on CUDA; under 5 minutes. No network and no
# install here: $(VENV) is built beforehand with a CUDA build of torch (README: GPU check).
# Without a GPU it says why and exits 0.
.PHONY: gpu-check
gpu-check:
	@test -x $(PY) || { echo "gpu-check: no $(PY); build it beforehand (README: GPU check)"; exit 2; }
	$(PY) -m tests.gpu.check --out state/gpu-check.json
