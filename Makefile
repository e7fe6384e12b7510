# The two commands a new user needs:
#   make demo   set everything up, then run the whole path on the embedded QM data
#   make test   set everything up, then run the test suite (CI runs this)
# On a GPU machine, install your CUDA build of torch into .venv first, or pass TORCH=... (see README).

VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/polyfid/torch_extensions

.PHONY: setup demo test clean

$(VENV)/.polyfid-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

setup: $(VENV)/.polyfid-installed

demo: setup
	$(VENV)/bin/polyfid demo

test: setup
	PYTHONUNBUFFERED=1 $(PY) -m pytest -v --durations=25

clean:
	rm -rf runs .pytest_cache
