# moo_kernels: `make test` sets up and runs the test suite, `make bench` sets up and runs the benchmark.
PY ?= python3
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: setup build test test-gpu bench liger-wheel lint clean

# Installs only what is missing: an installed torch / triton is used as it is (the GPU image has its own).
setup:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q triton==3.6.0
	@$(PY) -c "import pybind11, setuptools" 2>/dev/null || $(PY) -m pip install -q pybind11 setuptools
	@$(PY) -c "import pytest, hypothesis" 2>/dev/null || $(PY) -m pip install -q pytest hypothesis
	@$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q matplotlib
	@# The Triton interpreter (used without a GPU) of triton 3.6 needs numpy < 2.4.
	@$(PY) -c "import torch, numpy, sys; v = tuple(map(int, numpy.__version__.split('.')[:2])); \
		sys.exit(0 if torch.cuda.is_available() or v < (2, 4) else 1)" 2>/dev/null \
		|| $(PY) -m pip install -q "numpy<2.4"

build: setup
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest python_tests -q -p no:cacheprovider

test-gpu: build
	$(PY) -m pytest python_tests -q -p no:cacheprovider -m gpu

# The benchmarks on the machine's default device (cuda when available, else cpu): JSON + PNG in bench/results/,
# named <bench>_<device>_<date>. All run even when one fails; the target fails if any did.
bench: build
	@mkdir -p bench/results
	@dev=$$($(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"); day=$$(date -u +%Y%m%d); \
	rc=0; \
	for b in advantages policy_loss logits_loss; do \
		echo "== bench_$$b on $$dev"; \
		$(PY) bench/bench_$$b.py --device $$dev \
			--json bench/results/$${b}_$${dev}_$$day.json --plot bench/results/$${b}_$${dev}_$$day.png || rc=1; \
	done; \
	exit $$rc

# The Liger-Kernel wheel the logits benchmark compares against, for a GPU machine without network
# (bench/gpu_check.sh installs it from bench/wheels/, which is git-ignored).
liger-wheel:
	$(PY) -m pip download liger-kernel==0.8.5 --no-deps -d bench/wheels

lint:
	ruff check moo_kernels python_tests bench
	ruff format --check moo_kernels python_tests bench

clean:
	rm -rf build moo_kernels/*.so .pytest_cache
