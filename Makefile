# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is installed first and on its own so that its build is chosen here, not by a dependency.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

IMAGE ?=
LABELS ?=
OUT ?= out

# The real Label Studio server for end-to-end tests lives in its own virtualenv: its pins clash with ours.
LS_VENV ?= .venv-label-studio
LS_STAMP := $(LS_VENV)/.installed
# sentry-sdk 3 removed options Label Studio 1.23.2 passes at start-up (it then exits at once).
LABEL_STUDIO_SPEC ?= label-studio==1.23.2 'sentry-sdk>=2.16,<3'

.PHONY: setup run segment test lint bench label-studio browser clean

setup: $(STAMP)

label-studio: $(LS_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

$(LS_STAMP): Makefile
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install --quiet --disable-pip-version-check $(LABEL_STUDIO_SPEC)
	touch $(LS_STAMP)

# Headless Chromium and its driver for the browser tests, from Debian's packages (CI runs as root).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver; }

run: $(STAMP)
	$(VENV)/bin/maskclip-backend serve

segment: $(STAMP)
	@test -n "$(IMAGE)" -a -n "$(LABELS)" || { echo 'usage: make segment IMAGE=photo.jpg|folder LABELS="cat,dog|puppy,grass" [OUT=out]'; exit 2; }
	$(VENV)/bin/maskclip segment "$(IMAGE)" --labels "$(LABELS)" --out "$(OUT)"

test: $(STAMP) $(LS_STAMP) browser
	LABEL_STUDIO_BIN=$(LS_VENV)/bin/label-studio $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_backend.py

clean:
	rm -rf $(VENV) $(LS_VENV) .pytest_cache
