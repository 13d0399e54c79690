# Developer entry points. `make test` on a fresh clone creates .venv, installs the pinned
# requirements, builds the extension and runs the tests; later runs reuse .venv and rebuild only
# when the requirements, setup.py or the C++ sources changed.

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# BuildExtension finds ninja on PATH only; the venv's bin/ holds the pinned one.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: test bench clean gpu-check triton-compat

$(STAMP): requirements-dev.txt setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install --no-build-isolation -e .
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

# The default CPU sweep (under 5 minutes on a quiet 2-core machine): gaussian and fractional with
# row normalization, N = M = 256..4096, D = 64, C = 128, float32, fwd and fwd+bwd, every backend and
# peer that can run each case, outputs checked against float64 first; then the nonlocal-block suite
# (D = C = 128..1024, pooled keys, batches; see `nonlocal-bench --help`, --suite); writes bench/results/.
bench: $(STAMP)
	mkdir -p bench/results
	$(VENV)/bin/nonlocal-bench --device cpu --kernel gaussian,fractional --normalize row --update aggregate \
		--n 256,512,1024,2048,4096 --d 64 --c 128 --batch 1 --dtype float32 --pass fwd,fwd+bwd \
		--backends all --repeat 5 --check --table bench/results/cpu.txt --json bench/results/cpu.json \
		--csv bench/results/cpu.csv --plot bench/results/cpu.png
	$(VENV)/bin/nonlocal-bench --suite blocks --device cpu --dtype float32,bfloat16 --pass fwd,fwd+bwd \
		--backends dense,sdpa,reference,chunked,cpu,linear,auto --repeat 3 --no-memory \
		--table bench/results/blocks.txt --json bench/results/blocks.json

# For GPU owners (docs/gpu.md): the CUDA tests, the GPU targets benchmarked and judged (a verdict table;
# bench/results/cuda-<gpu name>.{txt,json,png}), the AOT report of the GPU's arch. Exit code 0 only when
# every target passed; without a CUDA device it stops at once with exit code 2.
gpu-check: $(STAMP)
	$(PY) -m nonlocal_ext.gpu_check

# The kernels under the other end of the supported Triton range (pyproject.toml): a venv of its own
# (.venv-triton<version>, the pinned torch) runs the interpreter suite and the AOT quick set there.
TRITON_COMPAT := 3.8.0
triton-compat: $(STAMP)
	$(PY) -m nonlocal_ext.triton_compat --triton $(TRITON_COMPAT) --venv .venv-triton$(TRITON_COMPAT)

# The sdist and the wheel (with _C compiled for .venv's torch) in dist/, each then installed into a
# fresh venv (pinned torch, from requirements-dev.txt) and smoke-tested (tests/test_install.py).
.PHONY: dist
dist: $(STAMP)
	rm -rf dist
	$(PY) -c "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])" dist
	$(PY) -m pip wheel --no-build-isolation --no-deps --wheel-dir dist .
	$(PY) tests/test_install.py dist

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -f nonlocal_ext/_C*.so

# Rewrite the generated tables of README.md and docs/ from bench/results/ and examples/results/
# (bench/tables.py); tests/test_docs.py fails while they disagree.
.PHONY: docs
docs: $(STAMP)
	$(PY) bench/tables.py
