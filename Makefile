# Two commands on a fresh Debian/Ubuntu machine with Python 3.11:
#   make run    set everything up and start the whole stack (no keys needed)
#   make test   set everything up and run the tests
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test setup setup-system frontend lint audit clean

run: setup
	$(BIN)/avatar-stack up

test: setup-system setup
	$(BIN)/ruff check .
	$(BIN)/pytest -ra

setup: $(STAMP) frontend/node_modules/livekit-client/dist/livekit-client.umd.js

$(STAMP): pyproject.toml requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps -r requirements-nodeps.txt
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

# Known vulnerabilities in the installed dependencies (pip-audit, in a venv of its own so it never
# changes ours). Report-only: offline machines cannot reach the advisory database.
audit: setup
	test -x .venv-audit/bin/pip-audit || ($(PYTHON) -m venv .venv-audit && .venv-audit/bin/pip install --quiet pip-audit==2.10.1)
	-timeout 300 .venv-audit/bin/pip-audit --path "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" --progress-spinner off --desc on

clean:
	rm -rf $(VENV) .venv-audit frontend/node_modules artifacts
