# The two commands a fresh machine needs: `make demo` and `make test`.
# HOST picks the ComfyUI to run on: 0.3.75 (default, from the registry) or 0.33.0 (from
# ../shared/hosts); each has its own venv. COMFYUI_PATH points at any other ComfyUI instead.
HOST ?= 0.3.75
# The one place that names a host's venv; scripts/setup.sh and .ci/run ask `make -s venv-path`.
VENV := $(if $(filter 0.3.75,$(HOST)),.venv,.venv-$(HOST))
PYTHON := $(VENV)/bin/python
export COMFYUI_PATH ?=
export BLOCK_CACHE_HOST := $(HOST)
export BLOCK_CACHE_VENV := $(CURDIR)/$(VENV)
.PHONY: setup venv-path demo test lint bench bench-dit bench-video bench-gpu train-reference train-reference-dit \
	train-reference-video workflows thumbnails browser-test

setup:
	bash scripts/setup.sh

venv-path:
	@echo $(VENV)

demo: setup
	$(PYTHON) scripts/demo.py --out out/demo

test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest tests -q $(PYTEST_ARGS)

lint: setup
	$(PYTHON) -m ruff check .

# Reference model and benchmark. `bench` writes table.md, results.json and a
# quality_vs_speedup_<setting>.png per sampler setting to out/bench (about 2-3 hours on one CPU thread);
# `train-reference` retrains models/reference/ (about an hour).
# `bench-dit` and `train-reference-dit`: the same for the transformer (Flux) reference model in
# models/reference_dit/ (benchmark about 40 minutes, training about 50); `bench-video` and
# `train-reference-video` for the video (Wan) reference model in models/reference_video/ (docs/benchmark-video.md;
# benchmark about 45 minutes for 30 steps and 75 for 50, training 65).
bench: setup
	OMP_NUM_THREADS=1 $(PYTHON) scripts/benchmark.py --out out/bench --threads 1

# The runtime on real hardware (issue 15): overhead, achieved / ideal speed-up, cache and profile memory,
# syncs per step; full-size SD1.5 and a Flux-shaped stack, about 2 minutes on an H200 (docs/benchmark/gpu_h200).
bench-gpu: setup
	$(PYTHON) scripts/bench_gpu.py --out out/bench-gpu

bench-dit: setup
	OMP_NUM_THREADS=1 $(PYTHON) scripts/benchmark.py --model dit --out out/bench_dit --threads 1

bench-video: setup
	OMP_NUM_THREADS=1 $(PYTHON) scripts/benchmark.py --model video --out out/bench_video --threads 1 --max-rungs 6

train-reference: setup
	OMP_NUM_THREADS=1 $(PYTHON) scripts/train_reference_model.py --minutes 55 --threads 1
	$(PYTHON) scripts/make_reference_card.py --log out/train/loss.csv

train-reference-dit: setup
	OMP_NUM_THREADS=1 $(PYTHON) scripts/train_reference_dit.py --threads 1
	$(PYTHON) scripts/make_reference_card.py --model dit --log out/train_dit/loss.csv

train-reference-video: setup
	OMP_NUM_THREADS=1 $(PYTHON) scripts/train_reference_video.py --threads 1
	$(PYTHON) scripts/make_reference_card.py --model video --log out/train_video/loss.csv --steps 30 --seeds 2

# Frontend (issue 4). Regenerate the example workflows (--schedule also re-profiles the bundled
# schedule), run the real-browser test alone (on the pinned and the newest frontend), or retake the
# thumbnails and README screenshots (from the pinned frontend).
workflows: setup
	$(PYTHON) scripts/make_example_workflows.py

browser-test: setup
	$(PYTHON) -m pytest tests/test_browser.py -q

thumbnails: setup
	BLOCK_CACHE_THUMBNAILS=1 $(PYTHON) -m pytest tests/test_browser.py -q
