# Developer entry points. `make test` on a fresh clone creates .venv, installs the pinned
# requirements, builds the extension and runs the tests; later runs reuse .venv and rebuild only
# when the requirements, setup.py or the C++ sources changed.

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# BuildExtension finds ninja on PATH only; the venv's bin/ holds the pinned one.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: test bench clean

$(STAMP): requirements-dev.txt setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install --no-build-isolation -e .
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/bench_backends.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -f nonlocal_ext/_C*.so
