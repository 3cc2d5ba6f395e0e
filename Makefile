# Two commands on a fresh Debian/Ubuntu machine with Python 3.11:
#   make run    set everything up and start the whole stack (no keys needed)
#   make test   set everything up and run the tests
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test setup setup-system frontend lint clean

run: setup
	$(BIN)/avatar-stack up

test: setup-system setup
	$(BIN)/ruff check .
	$(BIN)/pytest -ra

setup: $(STAMP) frontend/node_modules/livekit-client/dist/livekit-client.umd.js

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

frontend/node_modules/livekit-client/dist/livekit-client.umd.js: frontend/package.json frontend/package-lock.json
	bash frontend/setup.sh

# Test-only system tools: Chromium for browser tests, espeak-ng + sox to make test speech,
# npm for the page's pinned livekit-client.
setup-system:
	@missing=""; \
	for tool in chromium espeak-ng sox npm; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing (apt)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		pkgs=$$(echo "$$missing" | sed 's/\bnpm\b/nodejs npm/'); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends $$pkgs; \
	fi

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) frontend/node_modules artifacts
