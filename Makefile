# memguard: set-up, build and tests. `make demo` and `make test` work on a fresh Debian 12
# machine as root: they install what is missing, once, and then run.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# Debian packages the developer set-up needs (the one list): libzmq for the C unit tests
# (memguard._core itself links none: it uses pyzmq's), a compiler, clang/valgrind for the
# sanitizer runs, perl's prove for the TAP tests, and acl for `make test-matrix`'s
# unprivileged user.
APT_PACKAGES := libzmq3-dev pkg-config gcc make perl clang valgrind acl
# Debian 12's own Python stack, for `make test-compat` (ipykernel 6.17, NumPy 1.24).
APT_COMPAT_PACKAGES := python3-venv python3-dev python3-ipykernel python3-jupyter-client \
	python3-numpy python3-scipy python3-pytest python3-zmq python3-psutil \
	python3-humanfriendly python3-setuptools python3-tabulate python3-matplotlib
# Debian's browser and its WebDriver, for tests/test_browser.py in `make test` and
# `make test-browser` (JupyterLab, Notebook 7 and selenium come pinned from requirements/ci.txt).
APT_BROWSER_PACKAGES := chromium chromium-driver
CC ?= cc
CFLAGS_TEST := -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -g -O1 -Iinclude -Itests
ASAN := -fsanitize=address,undefined -fno-omit-frame-pointer
# The C units that need no Python: they are what the TAP tests link.
C_ENGINE := csrc/ring.c csrc/acct.c csrc/batch.c csrc/monitor.c csrc/reentry.c csrc/sites.c csrc/measures.c \
	csrc/zmqlib.c \
	csrc/blackbox.c csrc/elf_patch.c csrc/usable.c
C_TESTS := $(patsubst tests/t-%.c,tests/bin/t-%,$(wildcard tests/t-*.c))
PYSRC := $(wildcard jupyter_ext/memguard/*.py)
CSRC := $(wildcard csrc/*.c include/*.h)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: all demo test ctest pytest check-asan check-valgrind check-tsan test-compat lock clean deps \
	fuzz fuzz-short check-sanitize \
	bench bench-latency bench-launcher bench-attribution bench-monitor bench-overhead bench-paired bench-quick bench-callgrind \
	test-browser bench-dask bench-dask-callgrind bench-dask-per-task pytest-rest test-matrix lock-matrix

all: .stamp-installed

# --- set-up -----------------------------------------------------------------------------
# apt_install(packages): install those of the Debian packages that are not installed, once.
# dpkg-query's status, not `dpkg -s`: a removed package whose config files remain passes
# `dpkg -s`.
define apt_install
	@missing=$$(for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  $$( [ $$(id -u) -eq 0 ] || echo sudo ) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$( [ $$(id -u) -eq 0 ] || echo sudo ) apt-get install -y -qq $$missing >/dev/null; \
	fi
endef

.stamp-apt: Makefile
	$(call apt_install,$(APT_PACKAGES))
	@touch $@

$(VENV)/.stamp-deps: requirements/ci.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -r requirements/ci.txt
	@touch $@

# memguard itself, and a kernelspec inside the venv so kernels started from it run the
# venv's interpreter (a kernelspec elsewhere may point at another Python). Users install
# with plain `pip install` (README, "Install"); `make test-matrix` checks that path.
.stamp-installed: .stamp-apt $(VENV)/.stamp-deps setup.py pyproject.toml $(CSRC) $(PYSRC)
	$(VPY) -m pip install -q --no-build-isolation --no-deps --force-reinstall .
	$(VPY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (memguard venv)" >/dev/null
	@touch $@

deps: .stamp-installed

# --- the main job -----------------------------------------------------------------------
demo: .stamp-installed
	$(VPY) -m memguard.demo notebooks/sparse_to_dense.ipynb build

# --- tests ------------------------------------------------------------------------------
tests/bin/t-%: tests/t-%.c tests/tap.h $(C_ENGINE) $(wildcard include/*.h) | .stamp-apt
	@mkdir -p tests/bin
	$(CC) $(CFLAGS_TEST) $(CFLAGS_EXTRA) -o $@ $< $(C_ENGINE) -lzmq -lpthread -ldl

ctest: $(C_TESTS)
	prove --exec '' $(C_TESTS)

# The browser test is part of the suite: chromium and its driver are installed first, and
# MEMGUARD_REQUIRE_BROWSER=1 makes tests/test_browser.py fail, never skip, without them.
pytest: .stamp-installed .stamp-apt-browser
	cd tests && MEMGUARD_REQUIRE_BROWSER=1 ../$(VPY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) .

# CI (.ci/run) runs this: the C tests also under ASan+UBSan, valgrind and ThreadSanitizer,
# each fuzz target for 5 s, and the kernel tests on every CPython 3.10-3.13 (test-matrix).
# The developer venv runs the other Python tests (pytest-rest): the kernel tests run in the
# matrix, on this venv's version too, from the wheel.
test: ctest pytest-rest fuzz-short check-asan check-valgrind check-tsan test-matrix

MATRIX_TESTS = $(shell $(PY) tests/matrix.py --list-tests)
pytest-rest: .stamp-installed .stamp-apt-browser
	cd tests && MEMGUARD_REQUIRE_BROWSER=1 ../$(VPY) -m pytest -q -p no:cacheprovider \
	  $(addprefix --ignore=,$(MATRIX_TESTS)) $(PYTEST_ARGS) .

fuzz-short:
	$(MAKE) fuzz FUZZ_SECONDS=5

# The alert in a real browser (tests/test_browser.py): JupyterLab and Notebook 7 served on
# localhost, driven by headless chromium; screenshots in build/alert-*.png. `make test` runs
# the same test (its `pytest` step installs the browser too); this target runs it alone.
.stamp-apt-browser: Makefile
	$(call apt_install,$(APT_BROWSER_PACKAGES))
	@touch $@

test-browser: .stamp-installed .stamp-apt-browser
	cd tests && MEMGUARD_REQUIRE_BROWSER=1 ../$(VPY) -m pytest -q -p no:cacheprovider -s $(PYTEST_ARGS) test_browser.py

# The C tests under AddressSanitizer + UndefinedBehaviorSanitizer (with LeakSanitizer).
check-asan: .stamp-apt
	@mkdir -p build/asan
	for t in $(wildcard tests/t-*.c); do \
	  $(CC) $(CFLAGS_TEST) $(ASAN) -o build/asan/$$(basename $$t .c) $$t $(C_ENGINE) -lzmq -lpthread -ldl || exit 1; \
	done
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  prove --exec '' build/asan/t-*

# libFuzzer on the C parsers of outside input (tests/fuzz/fuzz-*.c), FUZZ_SECONDS each (60 by
# default; `make test` runs them 5 s). The committed corpus under tests/fuzz/corpus-* seeds a
# scratch copy in build/fuzz; a crash reproducer lands in build/fuzz/ (keep it under tests/).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := $(patsubst tests/fuzz/fuzz-%.c,%,$(wildcard tests/fuzz/fuzz-*.c))
fuzz: .stamp-apt
	@mkdir -p build/fuzz
	for t in $(FUZZ_TARGETS); do \
	  clang -std=c11 -D_GNU_SOURCE -g -O1 -Iinclude -fsanitize=fuzzer,address,undefined \
	    -fno-sanitize-recover=undefined -o build/fuzz/fuzz-$$t tests/fuzz/fuzz-$$t.c $(C_ENGINE) -lpthread -ldl || exit 1; \
	  rm -rf build/fuzz/corpus-$$t && cp -r tests/fuzz/corpus-$$t build/fuzz/corpus-$$t; \
	  build/fuzz/fuzz-$$t -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=build/fuzz/ \
	    build/fuzz/corpus-$$t 2>build/fuzz/fuzz-$$t.log || { tail -30 build/fuzz/fuzz-$$t.log; exit 1; }; \
	  tail -1 build/fuzz/fuzz-$$t.log; \
	done

# The kernel tests with memguard._core built with AddressSanitizer + UBSan: libasan is
# preloaded into pytest and (inherited) into every kernel, and PYTHONPATH puts the
# sanitized build of the package first. Leak checking is off: CPython keeps memory to exit.
# No quarantine: freed blocks must leave RSS, or the RSS budget rule sees them as untracked.
# Deselected: with libasan preloaded NumPy's temporary elision is off, so `b = np.ones(N) * 2`
# holds three blocks of its line at once and the churn control there is not a churn loop;
# ASan reserves terabytes of shadow address space, which no prlimit --as kernel allows; and
# the crash report's chart imports matplotlib, whose ft2font (a pybind11 module) throws a
# C++ exception at import that ASan's __cxa_throw interceptor aborts on (CHECK failed in
# asan_interceptors.cpp), outside memguard: those two tests run in `make test` only.
SAN_DESELECT ?= not churn_loop and not rlimit and not past_its_fraction and not killed_mid_cell \
	and not installed_memguard_shows
SAN_PYTEST ?= test_kernel.py test_detectors.py test_raise_limit.py test_crash_report.py test_hardening.py
check-sanitize: check-asan check-valgrind .stamp-installed
	rm -rf build/sanitize && mkdir -p build/sanitize
	CFLAGS="$(ASAN) -O1 -g" LDFLAGS="$(ASAN)" $(VPY) setup.py -q build_ext \
	  --build-lib build/sanitize/lib --build-temp build/sanitize/tmp >/dev/null
	cp jupyter_ext/memguard/*.py build/sanitize/lib/memguard/
	cd tests && LD_PRELOAD=$$($(CC) -print-file-name=libasan.so) \
	  PYTHONPATH=$(CURDIR)/build/sanitize/lib \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allow_user_segv_handler=1:quarantine_size_mb=0 \
	  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  ../$(VPY) -m pytest -q -p no:cacheprovider -x $(SAN_PYTEST) -k "$(SAN_DESELECT)"

# The C tests under ThreadSanitizer: every shared variable of the engine is an atomic with a
# stated order (each file's comments), so any report is a real race. libzmq is not
# instrumented: its own threads' synchronisation is invisible to TSan, hence the
# suppressions for reports that start inside it (tests/tsan.supp). clang, not gcc: gcc's TSan
# does not support atomic_thread_fence, which the seqlocks use (-Wtsan).
check-tsan: .stamp-apt
	@mkdir -p build/tsan
	for t in $(wildcard tests/t-*.c); do \
	  clang $(CFLAGS_TEST) -fsanitize=thread -o build/tsan/$$(basename $$t .c) $$t $(C_ENGINE) -lzmq -lpthread -ldl || exit 1; \
	done
	TSAN_OPTIONS=halt_on_error=1:exitcode=66:suppressions=$(CURDIR)/tests/tsan.supp \
	  prove --exec '' build/tsan/t-*

# The forked child in t-monitor leaks the parent's zmq context on purpose (never touch it
# after fork), so the child's own report is silenced; the parent is checked in full.
# --fair-sched=yes: valgrind runs one thread at a time, and by default a spinning thread
# keeps the lock; t-elf's patching under three busy threads took 439 s instead of 1.3 s.
check-valgrind: $(C_TESTS)
	for t in $(C_TESTS); do valgrind -q --fair-sched=yes --error-exitcode=1 --leak-check=full --child-silent-after-fork=yes $$t >/dev/null || exit 1; done
	@echo "valgrind: clean"

# --- benchmarks -------------------------------------------------------------------------
# `make bench` runs every benchmark; each writes its figures to build/.
bench: bench-latency bench-attribution bench-monitor bench-overhead bench-paired bench-launcher \
	bench-dask bench-dask-per-task

# Alert latency (bench/alert_latency.py): crossing allocation -> IOPub alert at a client,
# p50/p99/max per scenario; BENCH_ARGS="--quick" or "--runs 50" to change it.
bench-latency: .stamp-installed
	$(VPY) bench/alert_latency.py $(BENCH_ARGS)

# What memguard's kernel launcher costs IOPub: 10,000 stream messages with and without it
# (bench/launcher_cost.py). Its GIL-held alert row is part of bench-latency.
bench-launcher: .stamp-installed
	$(VPY) bench/launcher_cost.py $(BENCH_ARGS)

# memguard on Dask workers against plain workers (bench/dask_overhead.py): a dask.array
# reduction and a dask.dataframe group-by, a plain and a memguard 2-worker LocalCluster
# taking turns round by round (about 22 minutes); build/bench_dask.json.
bench-dask: .stamp-installed
	$(VPY) bench/dask_overhead.py $(BENCH_ARGS)

# The same workloads in instructions per worker thread, the workers under callgrind.
bench-dask-callgrind: .stamp-installed
	$(VPY) bench/dask_overhead.py --callgrind $(BENCH_ARGS)

# What memguard costs a worker per task (its begin and finish, thread CPU time) and what its
# monitor's native measures cost, in situ on one memguard cluster; build/bench_dask_per_task.json.
bench-dask-per-task: .stamp-installed
	$(VPY) bench/dask_overhead.py --per-task $(BENCH_ARGS)

# Line attribution's cost below and above its threshold (bench/attribution_overhead.py).
bench-attribution: .stamp-installed
	$(VPY) bench/attribution_overhead.py $(BENCH_ARGS)

# The monitor thread's own CPU time, with and without the black box (bench/monitor_cost.py).
bench-monitor: .stamp-installed
	$(VPY) bench/monitor_cost.py $(BENCH_ARGS)

# The peers bench/overhead.py compares with (memray, scalene, fil), pinned in
# requirements/bench.txt and installed into the venv here only: `make test` never needs
# them. Offline, the benchmark still runs and reports them as n/a.
$(VENV)/.stamp-bench: requirements/bench.txt $(VENV)/.stamp-deps
	@if $(VPY) -m pip install -q -r requirements/bench.txt; then touch $@; \
	else echo "bench: peers not installed; bench-overhead reports them as n/a"; fi

# Overhead against plain Python, tracemalloc and the peers (bench/overhead.py): table and
# build/bench.json. bench-quick: smaller inputs, plain and memguard only, in runners side by
# side (--paired: neighbouring runs cancel the machine's drift), about 2 minutes.
bench-overhead: .stamp-installed $(VENV)/.stamp-bench
	$(VPY) bench/overhead.py $(BENCH_ARGS)

# The wall-time targets (at most 1.03x plain for the native workloads, README "Overhead")
# are judged side by side: memguard against plain at full scale, in paired runners
# (build/bench_paired.json), since separate runs on a 2-core machine drift by more than 3 %.
bench-paired: .stamp-installed
	$(VPY) bench/overhead.py --paired --out build/bench_paired.json $(BENCH_ARGS)

bench-quick: .stamp-installed $(VENV)/.stamp-bench
	$(VPY) bench/overhead.py --quick --paired $(BENCH_ARGS)

# Instruction counts under valgrind's callgrind (build/bench_callgrind.json): ratios that
# do not drift with machine load. Not part of `make bench` (about 10 minutes).
bench-callgrind: .stamp-installed $(VENV)/.stamp-bench
	$(VPY) bench/overhead.py --callgrind $(BENCH_ARGS)

# --- the version matrix: CPython 3.10-3.13 -------------------------------------------------
# tests/matrix.py: the kernel tests on every CPython 3.10-3.13 found (pyenv's, or pythonX.Y
# on PATH), each in a fresh venv with requirements/matrix-pyX.Y.txt, memguard installed from
# a wheel that pip builds from the sdist in an isolated environment, as an unprivileged
# user. Prints which versions ran; under CI=true every version must be found.
# MATRIX_ARGS="--versions 3.12" to run one.
test-matrix: .stamp-installed
	rm -rf build/matrix && mkdir -p build/matrix/dist
	$(VPY) -m build --sdist -o build/matrix/dist . >/dev/null
	$(VPY) tests/matrix.py $(MATRIX_ARGS)

# Re-pin requirements/matrix-pyX.Y.txt: matrix.in plus memguard's own dependencies, resolved
# by each version's pip to the newest releases that version supports.
lock-matrix: .stamp-installed
	rm -rf build/lock-dist && $(VPY) -m build --sdist -o build/lock-dist . >/dev/null
	for v in 3.10 3.11 3.12 3.13; do \
	  py=$$($(VPY) -c "import sys; sys.path.insert(0, 'tests'); import matrix; print(matrix.find_python('$$v') or '')"); \
	  [ -n "$$py" ] || { echo "lock-matrix: no CPython $$v"; exit 1; }; \
	  rm -rf /tmp/mg-lock-$$v && $$py -m venv /tmp/mg-lock-$$v && \
	  /tmp/mg-lock-$$v/bin/pip install -q -r requirements/matrix.in build/lock-dist/memguard-*.tar.gz && \
	  (echo "# Generated by 'make lock-matrix' from matrix.in and memguard's own dependencies, for CPython $$v:"; \
	   echo "# the newest releases that version supports, every package pinned."; \
	   /tmp/mg-lock-$$v/bin/pip freeze --all | grep -viE "^(pip|setuptools|wheel|memguard)( @|==)") \
	    > requirements/matrix-py$$v.txt || exit 1; \
	done

# --- Debian 12's own stack: /usr/bin/python3, ipykernel 6.17, NumPy 1.24 ------------------
.venv-compat/.stamp: Makefile
	$(call apt_install,$(APT_COMPAT_PACKAGES))
	test -x .venv-compat/bin/python || /usr/bin/python3 -m venv --system-site-packages .venv-compat
	@touch $@

# pip builds in the source tree, and setuptools skips compiling when build/'s _core is newer
# than csrc/: without a build dir of its own this would install the .venv's build (other
# Python headers, NumPy 2 C-API) here, and a build from here breaks NumPy 2 in `make test`.
test-compat: .stamp-apt .venv-compat/.stamp
	rm -rf build/compat && mkdir -p build/compat && printf '[build]\nbuild_base = $(CURDIR)/build/compat\n' >build/compat/build.cfg
	DIST_EXTRA_CONFIG=$(CURDIR)/build/compat/build.cfg \
	  .venv-compat/bin/pip install -q --no-build-isolation --no-deps --no-index --force-reinstall .
	.venv-compat/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	cd tests && ../.venv-compat/bin/python -m pytest -q -p no:cacheprovider -m "not stack" .

# --- maintenance ------------------------------------------------------------------------
lock:
	rm -rf /tmp/mg-lock && $(PY) -m venv /tmp/mg-lock && /tmp/mg-lock/bin/pip install -q -r requirements/ci.in
	(echo "# Generated by 'make lock' from ci.in: every package pinned so CI is reproducible."; \
	 /tmp/mg-lock/bin/pip freeze --all | grep -v "^pip==") > requirements/ci.txt

clean:
	rm -rf build tests/bin *.egg-info .stamp-installed
