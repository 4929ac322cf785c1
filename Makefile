# lipcert: every target installs what it needs first (a fresh machine has nothing).
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FMNIST  := /usr/share/datasets/fashion-mnist

.PHONY: install data browser test lint serve default-model clean

# The embedded default: a CPU-sized BCOP network on Fashion-MNIST, two minutes of training.
DEFAULT_TRAIN := --method bcop --size xxs --dataset fashion-mnist --budget 2m
PORT ?= 3000

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) data

# Fashion-MNIST from Debian's package where apt works; training falls back to a download else.
data:
	@test -d $(FMNIST) || (command -v apt-get >/dev/null && \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null)) ) || \
	  echo "note: could not install dataset-fashion-mnist; Fashion-MNIST will be downloaded if online"

# Debian's chromium for the web page's browser test (tests/test_web_page.py drives it with
# Playwright; Playwright's own browser download is never used). Skipped, with a note, where apt
# cannot install it: the test then skips and says why.
browser:
	@test -x /usr/bin/chromium || (command -v apt-get >/dev/null && \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null)) ) || \
	  echo "note: could not install chromium; the browser test of the web page will be skipped"

test: install browser
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q

# Train the default model once, only when the BentoML store holds no lipcert model yet.
default-model: install
	@if $(BIN)/python -c "import sys; from certify.artifact.store import list_models_here; sys.exit(0 if list_models_here() else 1)"; then \
	  echo "lipcert models in the store: serving them"; \
	else \
	  echo "no lipcert model in the store: training the default ($(DEFAULT_TRAIN))"; \
	  OMP_NUM_THREADS=2 $(BIN)/python -m training $(DEFAULT_TRAIN); \
	fi

# The main job: serve every lipcert model (prediction + certified L2 radius) on http://127.0.0.1:$(PORT)
serve: default-model
	$(BIN)/bentoml serve --port $(PORT)

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
