# CapFilt: the two commands of the quick start are `make demo` and `make test`.
# Python 3.11 where it is installed (the version torch is served for here), else python3.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || echo python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch and torchvision first, pinned, so pip takes the builds this machine serves and nothing larger.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
# The versions the suite last passed with (`make lock` writes it anew): a fresh machine gets the same
# environment as CI, whatever the registries released since. pyproject keeps ranges for users.
CONSTRAINTS ?= constraints.txt

.PHONY: venv test lint demo bench bench-gpu clean-venv lock

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) $(TORCH_PKGS)
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

# Resolve the dependencies afresh in a scratch venv and pin what came: run it, then `make test`.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet $(TORCH_PKGS)
	.venv-lock/bin/python -m pip install --quiet -e '.[dev]'
	.venv-lock/bin/python -m pip freeze --exclude-editable > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	rm -rf .venv-lock

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: venv
	$(BIN)/capfilt demo --out runs/demo

# Throughput, recorded in docs/benchmarks.md: CPU (small, every path, the job's scaling run) and,
# where a GPU is present, base at 384 px.
bench: venv
	$(BIN)/capfilt bench throughput --device cpu --size small --pairs 512 --scaling 1000 10000
	$(BIN)/capfilt bench throughput --device cpu --size base --pairs 32 --check-images 8 --paths transformers exact fast

bench-gpu: venv
	$(BIN)/capfilt bench throughput --device cuda --size base --image-size 384 --pairs 2048 --batch-size 1024 \
		--check-images 64 --paths transformers exact fast

clean-venv:
	rm -rf $(VENV)
