# Two commands on a fresh machine with Python >= 3.11 and make:
#   make demo   sets up .venv and runs the main job (small byte-level GPT pretraining run)
#   make test   sets up .venv and runs the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test test-fast notebooks venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m experiments.train --config=experiments/configs/gpt_bytes.py --workdir=$(WORKDIR)

# The whole suite: the quick tests and those marked slow (notebooks, multi-process, ...).
test: venv
	$(PY) -m pytest -n 2 -m "slow or not slow" tests

# Quick inner loop while developing: everything not marked slow.
test-fast: venv
	$(PY) -m pytest -n 2 tests

# Re-runs the notebooks at their CPU size into experiments/notebooks/results/ (committed).
notebooks: venv
	$(PY) -m experiments.notebooks.build_ipynb --execute --size=cpu

clean:
	rm -rf $(VENV) runs
