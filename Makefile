# bpdl: set-up and everyday commands. Every target creates or reuses the virtual environment
# $(VENV), installs torch first (bpdl's extension is compiled against the installed torch, so
# it is built without build isolation), then bpdl itself.
#
#   make demo    install, then train and compare rules on MNIST and write the figures
#   make test    install, then run the test suite
#
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test,ray
DEMO_OUT ?= runs/compare
PYTEST_ARGS ?=

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP_TORCH := $(VENV)/.bpdl-torch
STAMP_BPDL := $(VENV)/.bpdl-installed

.PHONY: install demo test test-fast bench lint clean info

$(STAMP_TORCH):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH_SPEC) numpy
	$(PIP) install "scikit-build-core>=0.10" "pybind11>=2.12" ninja
	touch $@

$(STAMP_BPDL): $(STAMP_TORCH) pyproject.toml CMakeLists.txt Makefile
	$(PIP) install --no-build-isolation -Ceditable.rebuild=true -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP_BPDL)

demo: install
	$(BIN)/bpdl info
	$(BIN)/bpdl compare --dataset mnist --epochs 1 --out $(DEMO_OUT)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/train_throughput.py

lint: install
	$(BIN)/python -m ruff check python tests benchmarks

info: install
	$(BIN)/bpdl info

clean:
	rm -rf build $(STAMP_BPDL)
