# diffnas developer entry points. Each target creates .venv when missing and installs
# the project (editable, CPU torch pinned by constraints-cpu.txt) before running.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
# Optional extras installed for development so their tests run (not skip) in CI.
EXTRAS ?= dev,timeseries,tensorboard,export,rl


.PHONY: demo test test-oldest bench lint fashion-mnist clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml constraints-cpu.txt
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# The demo reads the real Fashion-MNIST files that Debian ships (no download at run time).
fashion-mnist:
	@if [ -f "$(FMNIST_DIR)/train-images-idx3-ubyte.gz" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST not found in $(FMNIST_DIR)."; \
	  echo "Install it with: sudo apt-get install dataset-fashion-mnist"; \
	  echo "or download the four IDX .gz files and run: make demo FMNIST_DIR=/path/to/dir"; \
	  exit 1; \
	fi

demo: $(STAMP) fashion-mnist
	$(PY) -m diffnas search --config configs/darts_fashion_mnist.yaml data.root=$(FMNIST_DIR)

test: $(STAMP)
	$(PY) -m pytest -x -q tests

# The test suite on the lowest releases pyproject.toml admits (constraints-oldest.txt) in
# .venv-oldest, with Python 3.10 (PYTHON_OLDEST). Not part of `make test`: it downloads
# about 3 GB. Run it when a dependency range or a torch-version workaround changes.
PYTHON_OLDEST ?= python3.10
test-oldest:
	@[ -x .venv-oldest/bin/python ] || $(PYTHON_OLDEST) -c "" 2>/dev/null || { \
	  echo "make test-oldest needs Python 3.10: give PYTHON_OLDEST=/path/to/python3.10"; \
	  exit 1; }
	[ -x .venv-oldest/bin/python ] || $(PYTHON_OLDEST) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install -q -c constraints-oldest.txt \
	  -e ".[$(EXTRAS),vision]"
	.venv-oldest/bin/python -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .venv-oldest runs bench_results
