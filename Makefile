# Both targets create and fill .venv on first use; torch is pinned to the local CPU wheel
# through constraints.txt so an unpinned resolve never pulls CUDA packages.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench study docs docs-figures clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e ".[test,bench,docs,wandb,mlflow,trackio]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stagewise train examples/demo.yaml --out runs/demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks docs
	$(VENV)/bin/mypy

# The site: the generated reference pages are written first (tests/test_docs.py checks that the
# committed ones match), then mkdocs builds site/ offline.
docs: $(STAMP)
	$(PY) docs/gen_reference.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# The pictures of the docs, from real runs (minutes; headless Chromium for the report screenshot).
docs-figures: $(STAMP)
	$(PY) docs/make_figures.py

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

# the study of what multi-step plans buy (benchmarks/study.py): runs/study/full, resumable
study: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/study.py

clean:
	rm -rf $(VENV) runs site
