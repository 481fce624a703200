# SIDE reference implementation. Every target works on a fresh machine with only python3:
# `make install` makes a virtual environment in $(VENV) and the other targets use it.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PROFILE ?= cpu
OUT     ?= results
PIP_FIND_LINKS ?= /opt/wheels
export PIP_FIND_LINKS

.PHONY: install test smoke bench reproduce mutate clean

install: $(VENV)/.installed  ## create the virtual environment and install requirements.txt

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

test: install  ## run the test suite (CPU, a few minutes)
	$(PY) -m pytest -q tests

smoke: install  ## the whole reproduce pipeline at tiny size, about 75 s on a 2-core CPU
	$(PY) reproduce.py --profile smoke --out $(OUT)/smoke

bench: install  ## training/sampling images/s, parameter count, nearest-neighbour throughput vs matmul peak
	$(PY) bench.py

reproduce: install  ## the paper's Table 1 and conditional-memorization analysis -> $(OUT)/REPORT.md (PROFILE=cpu|gpu)
	$(PY) reproduce.py --profile $(PROFILE) --out $(OUT)

mutate: install  ## mutation testing of the equation code (~25 min, one thread): killed/survived per mutant and the score
	OMP_NUM_THREADS=1 $(PY) mutate.py

clean:  ## remove outputs and caches (not the virtual environment)
	rm -rf results runs .pytest_cache __pycache__ tests/__pycache__
