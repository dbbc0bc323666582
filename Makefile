# Two entry points, each doing all set-up on a fresh machine:
#   make run   - the S6 suite on MNIST (seed protocol, 5 seeds) and its report in runs/s6
#   make test  - lint and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
SEEDS  ?= 5
BIN    := $(VENV)/bin

.PHONY: run test venv system-deps clean

$(BIN)/normlab: pyproject.toml requirements-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-cpu.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

$(BIN)/pytest: $(BIN)/normlab requirements-test.txt
	$(BIN)/python -m pip install -q -r requirements-test.txt
	$(BIN)/python -m pip install -q --no-deps timm==1.0.29
	touch $@

venv: $(BIN)/normlab

system-deps:
	bash scripts/system-deps.sh

run: venv
	bash scripts/system-deps.sh run || echo "tcmalloc, gcc or g++ not installed: training uses glibc's malloc (tuned), torch's norms or autograd, slower"
	$(BIN)/normlab data fetch --dataset mnist
	$(BIN)/normlab suite s6 --seeds $(SEEDS) --out runs/s6

test: venv $(BIN)/pytest system-deps
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/python -m pytest -q -n 2 --dist loadscope

clean:
	rm -rf $(VENV) build *.egg-info
