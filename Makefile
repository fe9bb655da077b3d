# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Nothing in tests, demos or CI may reach the Hub: everything they need is built locally.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

.PHONY: install test test-browser demo app reproduce study lint clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(OFFLINE) $(PY) -m pytest -q tests

# The main job on the embedded digits: train a tiny DiNof model on the CPU (~10 min on 2 cores), then sample it with
# DiNof and with the full PC sampler, same seed. Pictures and timings land in outputs/demo/.
# --digits_split train: the 1,500 training digits of the fixed split; the 297 test digits stay held out for
# evaluation (evaluate.py --reference digits:test, evaluate.py --likelihood).
# --score_time_range full: the score network also learns t > t*, so that the baseline sampler (which starts at T) is
# a fair comparison on the same weights; DiNof itself only needs t <= t*.
# One intra-op thread: the tiny model runs as fast on one core as on two, and it does not collapse when something
# else is busy on the machine (two spinning OpenMP threads on a shared core run ~20x slower).
DEMO_DIR := outputs/demo
DEMO_ENV := $(OFFLINE) OMP_NUM_THREADS=1
DEMO_TRAIN := $(DEMO_ENV) $(VENV)/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no training_scripts/train.py --output_dir $(DEMO_DIR)/pipeline --resolution 16 \
		--digits_split train --unet_config tiny --score_time_range full --max_train_steps 2500 --learning_rate 1e-3 \
		--lr_warmup_steps 100 --checkpointing_steps 1000 --checkpoints_total_limit 1 --save_images_steps 1000 --report_to tensorboard
demo: $(VENV)/.installed
	$(DEMO_TRAIN)
	$(DEMO_ENV) $(PY) training_scripts/sample.py --pipeline $(DEMO_DIR)/pipeline --output_dir $(DEMO_DIR) \
		--num_images 64 --seed 0 --compare_baseline

# The web demo (app.py, Gradio) on the demo's pipeline, trained first as `make demo` does if it is not there yet; open
# the address it prints. Another pipeline, address or port: make app APP_ARGS="--pipeline org/name --port 7861".
# Nothing leaves the machine (Gradio's analytics are off); a Hub id is downloaded once.
app: $(VENV)/.installed
	$(if $(findstring --pipeline,$(APP_ARGS)),,test -f $(DEMO_DIR)/pipeline/model_index.json || { $(DEMO_TRAIN); })
	HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False OMP_NUM_THREADS=1 $(PY) app.py $(APP_ARGS)

# The app's browser test: installs Chromium (Debian package, needs root or sudo) if missing, then loads the served
# page headless. `make test` runs the same test where Chromium is present and skips it elsewhere.
test-browser: $(VENV)/.installed
	command -v chromium > /dev/null || { $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -q && \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q --no-install-recommends chromium; }
	$(OFFLINE) $(PY) -m pytest -q tests/test_app.py -k browser -rs

# DiNof's claim on the digits: trains VE and VP models on the train digits, then FID / KID / confidence against NFE
# for the SDE prior, the flow and a Gaussian control with the PC sampler and the probability-flow ODE (heun, rk45),
# and bits/dim of 100 test digits (54 min on 2 quiet CPU cores, measured); writes outputs/reproduce/results.md and
# quality_vs_nfe.png. Resumable: run it again after an interruption.
reproduce: $(VENV)/.installed
	$(OFFLINE) $(PY) benchmarks/reproduce_claim.py --output_dir outputs/reproduce

# Where the flow prior pays (issue 12): headroom of x(t*) over its best Gaussian, flows of two sizes and Gaussian
# priors at t* in {0.2, 0.3, 0.4, 0.6} on the digits and on natural-image patches, sample quality at equal NFE
# (~90 min on 2 CPU cores); writes outputs/study/results.md and the plots. Resumable stage by stage.
study: $(VENV)/.installed
	$(OFFLINE) $(PY) benchmarks/flow_gain_study.py --output_dir outputs/study

lint: $(VENV)/.installed
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) outputs build *.egg-info
