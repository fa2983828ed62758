# Two entry points for a fresh machine; each sets up .venv first (idempotent).
#   make demo   install geoseg and predict the bundled sample scene
#   make test   install geoseg with its test extras and run the test suite (what CI runs)
# TORCH picks the torch build: the default takes the CPU wheel where one is provided locally;
# elsewhere use e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cpu".

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH)
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/geoseg predict sample_data/zion_sample.tif zion_sample_landcover.tif --overwrite
	@echo "wrote zion_sample_landcover.tif (open it in QGIS: classes are named and coloured)"

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(VENV)/.installed
	$(BIN)/python bench/bench_predict.py

clean:
	rm -rf $(VENV) bench/out zion_sample_landcover.tif zion_sample_landcover.tif.aux.xml
