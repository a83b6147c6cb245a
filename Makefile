# Two commands on a fresh machine with Python >= 3.11 and make:
#   make demo   sets up .venv and runs the main job (small byte-level GPT pretraining run)
#   make test   sets up .venv and runs the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test test-slow notebooks venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m experiments.train --config=experiments/configs/gpt_bytes.py --workdir=$(WORKDIR)

test: venv
	$(PY) -m pytest -n 2 tests

test-slow: venv
	$(PY) -m pytest -n 2 -m slow tests

notebooks: venv
	$(PY) -m experiments.notebooks.build_ipynb --execute

clean:
	rm -rf $(VENV) runs
