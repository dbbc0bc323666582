# Two entry points, each doing all set-up on a fresh machine:
#   make run   - the S6 suite on MNIST (seed protocol, 5 seeds) and its report in runs/s6
#   make test  - lint and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
SEEDS  ?= 5
BIN    := $(VENV)/bin
# Bytecode: pip writes it file by file, which was most of the set-up (the test requirements:
# 246 s with it, 70 s with --no-compile); compileall then writes the same on every core
# (71 s for the whole venv on 2). Without it every process would compile what it imports,
# each time, where PYTHONDONTWRITEBYTECODE is set (CI here: the tests took 21 min, not 14).
# A few packages ship files that are not Python 3, which compileall reports and pip skips.
COMPILE := $(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true

.PHONY: run test venv system-deps clean

$(BIN)/normlab: pyproject.toml requirements-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -r requirements-cpu.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	$(COMPILE)
	touch $@

$(BIN)/pytest: $(BIN)/normlab requirements-test.txt
	$(BIN)/python -m pip install -q --no-compile -r requirements-test.txt
	$(BIN)/python -m pip install -q --no-compile --no-deps timm==1.0.29
	$(COMPILE)
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
