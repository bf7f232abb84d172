# smtprelay-py: `make run` starts the relay with smtprelay.ini, `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ifeq ($(OS),Windows_NT)
PY     := $(VENV)/Scripts/python.exe
endif

.PHONY: run test lint check bench exe test-exe clean

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt $(VENV)/.runtime
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

run: $(VENV)/.runtime
	$(PY) relay.py smtprelay.ini

# In parallel (pytest-xdist) and shuffled (pytest-randomly prints its seed;
# TEST_ARGS="-p randomly --randomly-seed=N" replays an order, -n0 runs serially).
TEST_ARGS ?=
test: $(VENV)/.dev
	$(PY) -m pytest -q --timeout=120 -n 4 $(TEST_ARGS) tests

# ruff and mypy with the settings in pyproject.toml.
lint: $(VENV)/.dev
	$(PY) -m ruff check relay_lib tests bench relay.py
	$(PY) -m mypy

check: $(VENV)/.runtime
	$(PY) relay.py -check smtprelay.ini

# Benchmark (SPEC 8). Installs postfix's smtp-sink and smtp-source when missing,
# without a system mail setup. BENCH_ARGS passes options to bench/run.py.
bench: $(VENV)/.runtime
	@if ! command -v smtp-sink >/dev/null 2>&1 && ! test -x /usr/sbin/smtp-sink; then \
	  sudo=$$(test "$$(id -u)" -eq 0 || echo sudo); \
	  echo "postfix postfix/main_mailer_type select No configuration" | $$sudo debconf-set-selections && \
	  $$sudo apt-get update -q && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix; \
	fi
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist .pytest_cache .hypothesis outbox

# One-file executable (SPEC 1): dist/smtprelay, dist/smtprelay.exe on
# Windows. The spec file goes to build/ (ignored), so the tree stays clean;
# everything the program needs, bcrypt and ssl included, is inside the binary.
# The commit it was built from goes in as relay_lib/COMMIT, which -version reads.
EXE := dist/smtprelay
DATA_SEP := :
ifeq ($(OS),Windows_NT)
EXE := dist/smtprelay.exe
DATA_SEP := ;
endif

exe: $(VENV)/.dev
	mkdir -p build
	git rev-parse HEAD > build/COMMIT 2>/dev/null || echo unknown > build/COMMIT
	$(PY) -m PyInstaller --onefile --clean --noconfirm --log-level WARN --name smtprelay \
	    --specpath build --workpath build/pyinstaller --distpath dist \
	    --add-data "$(CURDIR)/build/COMMIT$(DATA_SEP)relay_lib" relay.py
	$(EXE) -version

# The process-level suites against the frozen binary instead of `python relay.py`.
test-exe: export SMTPRELAY_TEST_BINARY = $(EXE)
test-exe: exe
	$(PY) -m pytest -q --timeout=120 -n 4 tests/test_cli.py tests/test_e2e.py tests/test_dropin.py
