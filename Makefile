# Quick start: `make demo` and `make test` on a fresh machine. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# The pinned CPU wheel goes in first, and stays pinned on every later pip call: an unpinned torch would pull GBs of CUDA.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.mmlatent-installed
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*)
export HF_HUB_OFFLINE := 1

.PHONY: install demo test bench gpu-check clean

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(VPY) -m pip install -q $(TORCH_PIN)

$(STAMP): $(VPY) $(BUILD_INPUTS)
	$(VPY) -m pip install -q --no-build-isolation -e '.[test]' $(TORCH_PIN)
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VPY) -m mmlatent.cli demo

test: $(STAMP)
	$(VPY) -m pytest -x -q tests

bench: $(STAMP)
	$(VPY) -m mmlatent.bench
	$(VPY) -m pytest -q benches --benchmark-columns=median,iqr,rounds

# On a GPU machine whose image already has a CUDA torch and triton: build the extension in place with nvcc,
# run the GPU tests, then the benchmarks at real sizes in bf16 (results land in benches/results/<device>/).
gpu-check:
	MMLATENT_CUDA=1 MMLATENT_CUDA_ARCHS=90a $(PYTHON) setup.py -q build_ext --inplace
	$(PYTHON) -m pytest -q -m gpu tests
	$(PYTHON) -m mmlatent.bench --sizes gpu
	$(PYTHON) -m mmlatent.cli train --config configs/ivtlr-qwen2vl-7b-shapes-gpu.yaml \
		--report benches/results/$$($(PYTHON) -c "import torch, mmlatent.bench as b; print(b.device_label(torch.device('cuda')))")/train-ivtlr-7b-shapes.json
	gpus=$$($(PYTHON) -c "import torch; print(torch.cuda.device_count())"); if [ $$gpus -gt 1 ]; then \
		$(PYTHON) -m mmlatent.bench.data_parallel bench --sizes gpu --nproc $$gpus --out benches/results/$$($(PYTHON) \
		-c "import torch, mmlatent.bench as b; print(b.device_label(torch.device('cuda')))")/data-parallel; fi

clean:
	rm -rf build *.egg-info mmlatent/*.so
