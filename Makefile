# Loopy platform. `make demo` runs the whole job; `make test` runs the suite.
# Both create or reuse .venv and install what they need (system tools via apt-get when missing).
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Ray, MLflow and Serve stay local: embedded Ray with its temp dir inside the work tree.
export RAY_TMPDIR := $(CURDIR)/.ray_tmp
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

WORK ?= $(CURDIR)/work
SAMPLES := $(WORK)/samples
INGESTED := $(WORK)/ingested

.PHONY: install sysdeps browser test test-fast demo sample-data ingest train serve bench mlflow-ui clean

install: $(STAMP)

sysdeps:
	@missing=""; for t in ffmpeg espeak-ng sox; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system tools:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq ffmpeg espeak-ng sox >/dev/null; \
	fi

# Headless Chromium + chromedriver for the web page test (tests/test_web_page.py).
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  echo "installing chromium (web page test)"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null \
	  || echo "chromium could not be installed: tests/test_web_page.py will be skipped"; }

# torch is pinned here, in the same pip command, so pip never drags a CUDA build. The stamp also
# depends on this Makefile, so a venv made before an install line was added gets it too.
# facenet-pytorch only for the MTCNN weight files inside its wheel (pipelines/faces/mtcnn.py never
# imports it): --no-deps, because it pins torch<2.3 and torchvision, which would replace this torch.
$(STAMP): pyproject.toml Makefile | sysdeps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the project into $(VENV) (pip output: $(VENV)/install.log)"
	@$(PY) -m pip install -q --upgrade pip > $(VENV)/install.log 2>&1 \
	  && $(PY) -m pip install -q torch==2.13.0 -e '.[dev]' >> $(VENV)/install.log 2>&1 \
	  && $(PY) -m pip install -q --no-deps facenet-pytorch==2.6.0 >> $(VENV)/install.log 2>&1 \
	  || { tail -n 40 $(VENV)/install.log; echo "install failed: see $(VENV)/install.log"; exit 1; }
	@mkdir -p $(RAY_TMPDIR)
	@touch $(STAMP)

# The suite runs in TEST_WORKERS pytest-xdist processes (2 fits CI's 2 cores: one process alone
# keeps them only ~65 % busy, waiting on Ray start-ups, deadlines and polls). --dist loadfile keeps
# a module on one worker (its module fixtures are built once); tests/conftest.py hands the
# modules out longest first. TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2

test: install sysdeps browser
	@mkdir -p $(RAY_TMPDIR)
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

test-fast: install sysdeps
	$(PY) -m pytest -q -m "not slow" tests

sample-data: install sysdeps
	$(PY) -m pipelines.samples --output $(SAMPLES)

ingest: sample-data
	$(PY) pipelines/ingest.py --input $(SAMPLES) --output $(INGESTED)

train: install
	$(PY) train.py --data $(INGESTED) --stages 1,2

# The HTTP service on 127.0.0.1:8000 with the latest stage-2 model registered by `make train`.
MODEL ?= models:/loopy@stage2
serve: install
	$(PY) -m serve.app serve.model=$(MODEL)

demo: install sysdeps
	$(PY) demo.py --work $(WORK)

bench: install sysdeps
	$(PY) -m benchmarks.run

mlflow-ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf $(WORK) $(RAY_TMPDIR) .pytest_cache
