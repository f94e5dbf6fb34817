# The two commands of the quick start: `make demo` and `make test`. Each installs what is missing
# (scripts/setup.sh), configures, builds and runs.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: all setup configure build wheel test demo sanitize asan tsan fuzz bench format clean device-rehearsal

all: build

setup:
	@LEMA_VENV=$(VENV) bash scripts/setup.sh

configure: setup
	@cmake -S . -B $(BUILD) -G Ninja -DLEMA_PYTHON=$(PY) $(CMAKE_FLAGS) >$(BUILD).configure.log 2>&1 \
	  || { cat $(BUILD).configure.log; exit 1; }
	@grep -A8 'LEMA configuration' $(BUILD).configure.log || true

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

# The Python package as `pip wheel .` makes it, taken from the build folder just built (its
# configure is rerun with the same settings, so nothing is compiled twice), and installed into
# the venv the Python tests run in: they test the installed package, not python/.
wheel: build
	@rm -rf $(BUILD)/dist
	@if ! $(PY) -c 'import scikit_build_core, torch' 2>/dev/null; then \
	  echo "wheel: skipped, $(PY) lacks scikit-build-core or torch (LEMA_SKIP_PYTHON?)"; exit 0; fi; \
	$(PY) -m pip wheel -q --no-build-isolation --no-deps -w $(BUILD)/dist \
	  -C build-dir=$(abspath $(BUILD)) -C cmake.define.LEMA_PYTHON=$(PY) \
	  -C cmake.build-type=$$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' $(BUILD)/CMakeCache.txt) \
	  -C cmake.define.LEMA_BUILD_TESTS=ON -C cmake.define.LEMA_BUILD_BENCHMARKS=ON . \
	  >$(BUILD)/wheel.log 2>&1 || { cat $(BUILD)/wheel.log; exit 1; }; \
	$(PY) -m pip install -q --no-deps --force-reinstall $(BUILD)/dist/lema-*.whl

test: wheel
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

# The device run (benchmarks/device/run.sh) rehearsed here in full: the .debs unpacked into a
# prefix (the system's /usr ignored by the find calls), a fresh build with torch on, the CUDA
# phases against the fake driver. By hand, not in CI (a full build); the ctest `device_rehearsal`
# runs the short one on the main build. BUDGET as the device call's --budget.
BUDGET ?= 3600
device-rehearsal: setup
	@ls benchmarks/device/debs/*.deb >/dev/null 2>&1 || bash benchmarks/device/fetch_debs.sh
	@LEMA_PYTHON=$(PY) LEMA_DEVICE_BUILD_DIR=$(CURDIR)/build-device-rehearsal \
	  bash benchmarks/device/run.sh --cpu-rehearsal --debs benchmarks/device/debs \
	  --budget $(BUDGET) out/device-rehearsal

format:
	@git ls-files '*.cpp' '*.hpp' | xargs clang-format -i

clean:
	rm -rf $(BUILD) build-asan build-tsan build-fuzz build-device-rehearsal
