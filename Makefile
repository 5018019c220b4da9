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

.PHONY: setup run test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	@test -n "$(IMAGE)" -a -n "$(LABELS)" || { echo 'usage: make run IMAGE=photo.jpg|folder LABELS="cat,dog|puppy,grass" [OUT=out]'; exit 2; }
	$(VENV)/bin/maskclip segment "$(IMAGE)" --labels "$(LABELS)" --out "$(OUT)"

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) .pytest_cache
