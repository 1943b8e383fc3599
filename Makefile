# One command sets everything up on a fresh machine and runs the tests
# (`make test`); one sets up and runs the benchmark suite (`make bench`).

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.14.1
MAX_JOBS    ?= $(shell nproc)
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
# The toolkit root: nvcc may be a wrapper script outside it.
CUDA_HOME   ?= $(shell sh tools/cuda_home.sh)

# AddressSanitizer for the tests of the CUDA kernels' code under the CPU emulator
# (tests/cuda_emu): its runtime, and libstdc++ so that it finds __cxa_throw when it
# starts. Empty where the compiler has none: those tests then run without it.
ASAN_PRELOAD ?= $(shell a=$$($(CC) -print-file-name=libasan.so); s=$$($(CC) -print-file-name=libstdc++.so); \
                  [ -f "$$a" ] && [ -f "$$s" ] && echo "$$a $$s")

export MAX_JOBS CUDA_HOME

.PHONY: venv build lint test test-cuda bench report clean device-versions min-versions dist-check

$(VENV)/.ready:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)" numpy ninja
	touch $@

venv: $(VENV)/.ready

# Test extras and the libraries the parity tests compare against.
$(VENV)/.test-deps: $(VENV)/.ready
	$(PIP) install -q pytest pytest-benchmark hypothesis timm lightly matplotlib ruff
	touch $@

$(VENV)/.bench-deps: $(VENV)/.test-deps
	$(PIP) install -q kornia
	touch $@

# Rebuilt only when a C++/CUDA source or the build script changes.
EXT_SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h')

$(VENV)/.built: $(VENV)/.ready $(EXT_SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built
	$(PY) -c "import sslfast; print('sslfast: CPU kernels', sslfast.has_cpu_kernels(), '| CUDA kernels', sslfast.has_cuda_kernels())"

lint: $(VENV)/.test-deps
	$(VENV)/bin/ruff check .

# Two runs: everything but the emulated CUDA kernels, then those under AddressSanitizer
# (capturing Python's streams only: a report, written to fd 2 as the process ends,
# must reach the log). pytest's "no tests collected" (5) is not a failure.
test: $(VENV)/.test-deps lint build
	$(PY) -m pytest tests -q -m "not cuda_emu" ; rc=$$?; [ $$rc -eq 5 ] && rc=0; \
	LD_PRELOAD="$(ASAN_PRELOAD)" ASAN_OPTIONS=detect_leaks=0 $(PY) -m pytest tests -q -m cuda_emu --capture=sys ; \
	rc2=$$?; [ $$rc2 -eq 5 ] && rc2=0; \
	echo "pytest: rc $$rc (tests), $$rc2 (emulated CUDA kernels$(if $(ASAN_PRELOAD),, without AddressSanitizer))"; \
	[ $$rc -eq 0 ] && [ $$rc2 -eq 0 ]

test-cuda: $(VENV)/.test-deps build
	$(PY) -m pytest tests -q -m cuda

bench: $(VENV)/.bench-deps build
	$(PY) -m sslfast.bench --check $(BENCH_ARGS)
	$(PY) -m sslfast.bench.report

# HEAD checked against other versions on this machine: cloned into build/<target>,
# `make test` there in a venv pinned by a constraints file (the extension built against
# that torch's headers, the Triton tests under that Triton's interpreter), then every
# Triton kernel compiled for sm_90 by that Triton. Not part of `make test`.
#   device-versions: the GPU machine's (tools/device_versions.txt: torch 2.11, Triton 3.6)
#   min-versions:    the floors pyproject.toml declares (tools/min_versions.txt: torch 2.8,
#                    Triton 3.4), CPU kernels only: that torch is built for CUDA 12.8 and
#                    refuses this machine's CUDA 13 toolkit
define versions_check
	rm -rf build/$(1) && git clone -q . build/$(1)
	$(3) PIP_CONSTRAINT=$(CURDIR)/tools/$(2) $(MAKE) -C build/$(1) test \
	    TORCH_SPEC="$$(grep '^torch==' tools/$(2))"
	cd build/$(1) && .venv/bin/python tools/compile_kernels.py --archs 90
endef
device-versions:
	$(call versions_check,device-versions,device_versions.txt)
min-versions:
	$(call versions_check,min-versions,min_versions.txt,SSLFAST_FORCE_CPU=1)

# The user's install path: an sdist of the tree, a wheel built from it alone (CPU
# kernels), sslfast imported from that wheel outside the checkout (tools/dist_check.py).
dist-check: $(VENV)/.ready
	$(PY) tools/dist_check.py

report: $(VENV)/.test-deps
	$(PY) -m sslfast.bench.report

clean:
	rm -rf build sslfast/_C*.so *.egg-info $(VENV)/.built
