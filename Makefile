# TerraScope for QGIS. Two commands: `make run` and `make test` (see README.md).
# Every install step lives here, so a clean clone on a fresh Debian 12 machine works.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
QVENV := .venv-qgis
WPY := $(VENV)/bin/python
QPY := $(QVENV)/bin/python
PIP_FLAGS := -q --disable-pip-version-check
export QT_QPA_PLATFORM ?= offscreen
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: run test test-worker test-qgis test-gpu deps sysdeps bench bench-gpu bench-gpu-pool package pack-data train-mini lint clean

# --- installs (idempotent: stamps make a second run take seconds) ---------------------------
sysdeps: .stamps/sysdeps
.stamps/sysdeps:
	@mkdir -p .stamps
	@if ! /usr/bin/python3 -c "import qgis.core, zmq" 2>/dev/null || ! command -v qgis_process >/dev/null \
	    || ! $(PY) -m venv --help >/dev/null 2>&1; then \
	  echo "Installing Debian packages (python3-qgis, python3-zmq, python3-venv, qgis for qgis_process)..."; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    python3-qgis python3-zmq python3-venv qgis-providers >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends qgis >/dev/null; fi
	@touch $@

$(VENV)/.stamp: requirements/worker.txt requirements/test.txt pyproject.toml | .stamps/sysdeps
	@echo "Creating worker venv $(VENV) (torch CPU 2.13.0, transformers, rasterio, pyproj)..."
	@test -x $(WPY) || $(PY) -m venv $(VENV)
	@$(WPY) -m pip install $(PIP_FLAGS) -r requirements/worker.txt -r requirements/test.txt
	@$(WPY) -m pip install $(PIP_FLAGS) --no-deps --no-build-isolation -e .
	@touch $@

$(QVENV)/.stamp: requirements/qgis-test.txt | .stamps/sysdeps
	@echo "Creating QGIS test venv $(QVENV) (system site packages: QGIS, PyQt5, pyzmq)..."
	@test -x $(QPY) || /usr/bin/python3 -m venv --system-site-packages $(QVENV)
	@$(QPY) -m pip install $(PIP_FLAGS) -r requirements/qgis-test.txt
	@touch $@

deps: $(VENV)/.stamp $(QVENV)/.stamp

# --- the two commands ------------------------------------------------------------------------
run: $(VENV)/.stamp
	@$(WPY) -m worker.demo

test: deps
	@$(MAKE) --no-print-directory test-worker
	@$(MAKE) --no-print-directory test-qgis

test-worker: $(VENV)/.stamp
	$(WPY) -m pytest -q -p no:cacheprovider tests --ignore=tests/qgis

test-qgis: $(QVENV)/.stamp $(VENV)/.stamp
	TERRASCOPE_WORKER_PYTHON=$(abspath $(WPY)) $(QPY) -m pytest -q -p no:cacheprovider tests/qgis

# --- more ------------------------------------------------------------------------------------
bench: $(VENV)/.stamp
	$(WPY) -m bench.run_all

# GPU targets use the machine's own CUDA torch (python3), not the CPU venv.
bench-gpu:
	$(PY) -m bench.gpu

bench-gpu-pool:
	$(PY) -m bench.gpu_pool

test-gpu:
	$(PY) -m pytest -q -s -m gpu tests/model

package:
	$(PY) -m qgis_plugin.package --out dist

# Build the Terra-CoT dataset from the EO samples and pack it for a GPU box (see docs/TRAINING.md).
pack-data: $(VENV)/.stamp
	$(WPY) -m model.data.build --src $${EO_SAMPLES:?set EO_SAMPLES to the eo-samples folder} --out data/terra-cot-mini --seed 0
	$(WPY) -m model.training.pack --data data/terra-cot-mini --out .carry/terra-cot-pack --format jpg --quality 85 --val-limit 256 --gzip

train-mini:
	PY=$(PY) bash scripts/train_mini_gpu.sh

lint: $(VENV)/.stamp
	$(WPY) -m ruff check .

clean:
	rm -rf .stamps $(VENV) $(QVENV) dist build
