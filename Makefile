# Two entry points: `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,tensorboard,bench,nvrtc]'
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(PY) -m nanochat.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	cd asv_bench && ../$(PY) -m asv machine --yes && ../$(PY) -m asv run --python=same --quick

clean-venv:
	rm -rf $(VENV)
