# moo_kernels: `make test` sets up and runs the test suite, `make bench` sets up and runs the benchmark.
PY ?= python3
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
# The trainer versions the integration tests run against (also pyproject.toml's "integrations" extra).
INTEGRATION_PINS := {'trl': '1.16.0', 'transformers': '5.10.4', 'verl': '0.9.1', 'ray': '2.60.0', \
	'tensordict': '0.10.0', 'omegaconf': '2.4.0', 'codetiming': '1.4.0'}

.PHONY: setup build test test-gpu sanitize bench plots gpu-rehearsal peer-wheels lint clean

# Installs only what is missing: an installed torch / triton is used as it is (the GPU image has its own).
setup:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q triton==3.6.0
	@$(PY) -c "import pybind11, setuptools" 2>/dev/null || $(PY) -m pip install -q pybind11 setuptools
	@$(PY) -c "import pytest, hypothesis" 2>/dev/null || $(PY) -m pip install -q pytest hypothesis
	@$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q matplotlib
	@# The trainer integrations' tests: TRL, and verl without its GPU stack (only what core_algos imports).
	@# The installed torch is pinned as it is, so that pip never replaces it.
	@$(PY) -c "import importlib.metadata as m, sys; \
		sys.exit(any(m.version(p) != v for p, v in $(INTEGRATION_PINS).items()))" 2>/dev/null || { \
		$(PY) -m pip install -q trl==1.16.0 transformers==5.10.4 ray==2.60.0 tensordict==0.10.0 omegaconf==2.4.0 \
			codetiming==1.4.0 "torch==$$($(PY) -c 'import torch; print(torch.__version__)')" \
		&& $(PY) -m pip install -q --no-deps verl==0.9.1; }
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

# The C++ kernels under AddressSanitizer and UndefinedBehaviorSanitizer: a build of their own in build/sanitize/
# (-O1 -g, frame pointers; the normal build is left as it is), loaded through MOO_KERNELS_EXTENSION, and the tests
# that run the C++ backend. The ASan runtime is preloaded, and libstdc++ with it (else ASan cannot intercept the
# C++ exceptions torch throws); leaks are not reported (the interpreter keeps memory until exit by design); the
# first undefined behaviour stops the run with its stack; --capture=sys lets a report reach the terminal.
# Not part of `make test`: about 7.5 minutes on 2 cores from scratch, most of it the build; 1 to 2 minutes once built.
SANITIZE_DIR := build/sanitize
SANITIZE_TESTS := python_tests/test_advantages.py python_tests/test_advantages_numerics.py \
	python_tests/test_policy_loss.py python_tests/test_loss_numerics.py python_tests/test_logits.py \
	python_tests/test_logits_cpu.py python_tests/test_brier.py python_tests/test_interfaces.py python_tests/test_codes.py
SANITIZE_ENV = LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	MOO_KERNELS_EXTENSION="$$(ls $(SANITIZE_DIR)/moo_kernels/_C*.so)"
sanitize: setup
	MOO_KERNELS_SANITIZE=1 $(PY) setup.py build_ext --build-lib $(SANITIZE_DIR) --build-temp $(SANITIZE_DIR)/obj
	$(SANITIZE_ENV) $(PY) -c "from moo_kernels._backend import cpp; f = cpp().__file__; print('testing', f); \
		assert '$(SANITIZE_DIR)/' in f"
	$(SANITIZE_ENV) $(PY) -m pytest $(SANITIZE_TESTS) -k "cpp or not triton" -q -p no:cacheprovider --capture=sys

# Every benchmark suite on the machine's default device (cuda when available, else cpu): a table per suite,
# JSON + PNG in bench/results/ named <suite>_<device>_<date>, then the README's performance section from them.
# About 1.5 minutes on a 2-core CPU, torch.compile baselines included (BENCH_ARGS=--no-compile drops them).
bench: build
	$(PY) -m moo_kernels.bench $(BENCH_ARGS)
	$(PY) bench/render_readme.py

# PNG of every results JSON in bench/results/ that has none or an older one (results copied back from a GPU run
# come as JSON alone), then the README's performance section from the results.
plots:
	$(PY) -m moo_kernels.bench.plot --missing bench/results/*.json
	$(PY) bench/render_readme.py

# bench/gpu_check.sh on the CPU: every step at tiny sizes, the Triton kernels under the interpreter (about a minute).
gpu-rehearsal: build
	MOO_GPU_CHECK_REHEARSAL=1 bash bench/gpu_check.sh

# The peers' wheels the benchmarks compare against (Liger-Kernel; Cut Cross-Entropy, CUDA only), for a GPU machine
# without network, in bench/wheels/ (git-ignored): bench/gpu_check.sh installs Liger-Kernel's; for `make bench`,
# `pip install --no-deps bench/wheels/*.whl`.
peer-wheels:
	$(PY) -m pip download liger-kernel==0.8.5 cut-cross-entropy==25.1.1 --no-deps -d bench/wheels

lint:
	ruff check moo_kernels python_tests bench examples
	ruff format --check moo_kernels python_tests bench examples

clean:
	rm -rf build moo_kernels/*.so .pytest_cache
