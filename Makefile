# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := runs/demo
DEMO_FLAGS ?= --backbone resnet10t --image-size 32 --epochs 8 --batch-size 64

.PHONY: venv demo test test-fast bench clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

# Pretrain on the built-in digits (CPU, or the GPU if there is one), then evaluate.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(PY) train.py --data digits --out $(DEMO) $(DEMO_FLAGS)
	$(PY) evaluate.py --run $(DEMO)

# Every test (what CI runs); test-fast leaves out those marked slow (they start processes or train).
test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmark.py all --json runs/benchmark.json

clean:
	rm -rf runs .pytest_cache
