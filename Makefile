# `make demo` and `make test` bootstrap everything on a fresh machine (Python 3.11 and the
# package registries): a cached venv, ComfyUI 0.3.75 (or $COMFYUI_PATH), the tiny models.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
STREAMLOADER_CACHE ?= $(HOME)/.cache/comfyui-streamloader
export STREAMLOADER_CACHE
CACHE := $(STREAMLOADER_CACHE)
PORT ?= 8188
BOOT = eval "$$(bash scripts/bootstrap.sh)"
# After BOOT: Debian's chromium and playwright for tests/browser (BROWSER_LIBS, CHROMIUM).
BROWSER = eval "$$(bash scripts/browser_env.sh "$$VENV")"
MODELS_DEFAULT = $(CACHE)/models-$(shell cat scripts/make_models.py | sha256sum | cut -c1-12)
MODELS ?= $(MODELS_DEFAULT)
PYTEST_ARGS ?=
PYTEST_MARKS ?=

.PHONY: env models demo serve test test-load test-upstream unit bench bench-virtual bench-pack gpu-pack gpu-check

env:
	@$(BOOT) >/dev/null

models: env
	@$(BOOT); if [ ! -f "$(MODELS_DEFAULT)/.complete" ]; then \
	  rm -rf "$(MODELS_DEFAULT)"; \
	  (cd "$$COMFYUI_PATH" && PYTHONPATH="$$COMFYUI_PATH" "$$VENV/bin/python" "$(CURDIR)/scripts/make_models.py" "$(MODELS_DEFAULT)"); \
	  touch "$(MODELS_DEFAULT)/.complete"; fi

demo: models
	@$(BOOT); "$$VENV/bin/python" scripts/demo.py "$$COMFYUI_PATH" "$(MODELS)"

# MODELS=DIR adds DIR's models to the demo models.
serve: models
	@$(BOOT); "$$VENV/bin/python" scripts/comfy_server.py "$$COMFYUI_PATH" "$(PORT)" "$(MODELS_DEFAULT)" "$(MODELS)"

test: models
	@$(BOOT); $(BROWSER); COMFYUI_PATH="$$COMFYUI_PATH" STREAMLOADER_MODELS="$(MODELS_DEFAULT)" \
	  BROWSER_LIBS="$$BROWSER_LIBS" CHROMIUM="$$CHROMIUM" VENV="$$VENV" "$$VENV/bin/python" -m pytest -m "$(PYTEST_MARKS)" $(PYTEST_ARGS)

# The load test with its latency and RSS bounds, on 0.3.75.
test-load:
	@$(MAKE) --no-print-directory test PYTEST_MARKS=load PYTEST_ARGS="tests/server/test_load_many_clients.py -s $(PYTEST_ARGS)"

# The whole suite (unit, in-process, server, browser) on upstream ComfyUI, unpacked from the tarball into the
# cache with its own venv (`scripts/bootstrap.sh upstream`). torchaudio has no wheel for torch
# 2.14.1, so tests/stubs (an import stub: imports succeed, any use raises) is on PYTHONPATH, for
# pytest and the servers it starts; a pinned older torch with its torchaudio would test another
# torch than `make test` does. With STREAMLOADER_UPSTREAM_OPTIONAL set (.ci/run), an absent
# tarball is a skip, not a failure.
STREAMLOADER_UPSTREAM_TARBALL ?= $(CURDIR)/../shared/comfyui/ComfyUI-0.33.0.tar.gz
export STREAMLOADER_UPSTREAM_TARBALL

test-upstream: models
	@if [ ! -f "$(STREAMLOADER_UPSTREAM_TARBALL)" ]; then \
	  msg="no upstream ComfyUI tarball at $(STREAMLOADER_UPSTREAM_TARBALL) (it is on this project's machines only; set STREAMLOADER_UPSTREAM_TARBALL to a ComfyUI source .tar.gz)"; \
	  if [ -n "$${STREAMLOADER_UPSTREAM_OPTIONAL:-}" ]; then echo "test-upstream: skipped: $$msg"; exit 0; fi; \
	  echo "test-upstream: $$msg" >&2; exit 1; fi; \
	eval "$$(bash scripts/bootstrap.sh upstream)"; $(BROWSER); COMFYUI_PATH="$$COMFYUI_PATH" STREAMLOADER_MODELS="$(MODELS_DEFAULT)" \
	  BROWSER_LIBS="$$BROWSER_LIBS" CHROMIUM="$$CHROMIUM" VENV="$$VENV" PYTHONPATH="$(CURDIR)/tests/stubs" \
	  "$$VENV/bin/python" -m pytest -m "$(PYTEST_MARKS)" tests/unit tests/comfy tests/server tests/browser $(PYTEST_ARGS)

unit: env
	@$(BOOT); "$$VENV/bin/python" -m pytest tests/unit $(PYTEST_ARGS)

# The streaming benchmark: on a GPU if there is one, else on the simulated device (CPU).
bench: env
	@$(BOOT); "$$VENV/bin/python" bench/stream_bench.py --comfy "$$COMFYUI_PATH" $(BENCH_ARGS)

# The end-to-end streamed rows on the virtual clock (no GPU): what the schedule alone costs.
bench-virtual: env
	@$(BOOT); "$$VENV/bin/python" bench/sdxl_virtual.py --comfy "$$COMFYUI_PATH" $(BENCH_ARGS)

# A copy of ComfyUI in .comfy/ (git-ignored) for a GPU machine that has torch but not ComfyUI:
# carry .comfy and run `python3 bench/stream_bench.py` there.
bench-pack: env
	@$(BOOT); rm -rf .comfy && cp -r "$$COMFYUI_PATH" .comfy && find .comfy -name __pycache__ -prune -exec rm -rf {} +

# The GPU check, for a GPU machine with Python 3.12 and torch but no ComfyUI and no network (the
# device tool: carry [".gpu"], command `make gpu-check`). gpu-pack prepares .gpu/ here (git-ignored);
# gpu-check installs its wheels, makes the tiny models, runs the tests on CUDA on both ComfyUI
# versions, the benchmark and the end-to-end rows (an SDXL-sized checkpoint on real servers), and
# writes gpu_check.json to $OUT (or bench/results/). No venv there. GPU_CHECK_ARGS="--stages bench,e2e"
# runs some stages only; the README's recipe splits the device tool's 15 minutes in two calls.
gpu-pack: env
	@$(BOOT); bash scripts/gpu_pack.sh "$$VENV/bin/python" "$$COMFYUI_PATH" "$(STREAMLOADER_UPSTREAM_TARBALL)"

gpu-check:
	python3 scripts/gpu_check.py $(GPU_CHECK_ARGS)
