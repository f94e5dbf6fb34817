# The two commands of the quick start: `make demo` and `make test`. Each installs what is missing
# (scripts/setup.sh), configures, builds and runs.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: all setup configure build test demo sanitize asan tsan fuzz bench format clean

all: build

setup:
	@LEMA_VENV=$(VENV) bash scripts/setup.sh

configure: setup
	@cmake -S . -B $(BUILD) -G Ninja -DLEMA_PYTHON=$(PY) $(CMAKE_FLAGS) >$(BUILD).configure.log 2>&1 \
	  || { cat $(BUILD).configure.log; exit 1; }
	@grep -A8 'LEMA configuration' $(BUILD).configure.log || true

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

test: build
	@cd $(BUILD) && ctest --output-on-failure -j $(JOBS) --timeout 600

demo: build
	@bash scripts/demo.sh $(BUILD)

# Torch-free libraries and their tests under ASan+UBSan and under TSan.
sanitize: asan tsan

asan: setup
	@cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DLEMA_SANITIZE=address,undefined \
	  -DLEMA_WITH_TORCH=OFF -DLEMA_BUILD_BENCHMARKS=OFF -DLEMA_PYTHON=$(PY) >/dev/null
	@cmake --build build-asan -j $(JOBS)
	@cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  ctest --output-on-failure -j $(JOBS) -LE 'python|slow' --timeout 600

tsan: setup
	@cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLEMA_SANITIZE=thread \
	  -DLEMA_WITH_TORCH=OFF -DLEMA_BUILD_BENCHMARKS=OFF -DLEMA_PYTHON=$(PY) >/dev/null
	@cmake --build build-tsan -j $(JOBS)
	@cd build-tsan && ctest --output-on-failure -j $(JOBS) -LE 'python|slow' --timeout 600

# Bounded libFuzzer run of the header parser under ASan+UBSan (clang).
fuzz: setup
	@bash scripts/fuzz.sh

format:
	@git ls-files '*.cpp' '*.hpp' | xargs clang-format -i

clean:
	rm -rf $(BUILD) build-asan build-tsan build-fuzz
