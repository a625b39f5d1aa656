# The two entry points of the README. Both create .venv on first use. torch and triton are pinned here
# (CPU torch; the Triton whose compiled kernels kernels.compile_check checks), not in pyproject.toml, so
# GPU clusters keep the CUDA torch and the Triton it comes with.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 triton==3.9.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

.PHONY: install quickstart test
install: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(VENV)/bin/xgem-dist quickstart

test: $(VENV)/.installed
	$(PY) -m pytest -q
