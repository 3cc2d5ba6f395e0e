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

test: setup setup-system
	$(BIN)/ruff check .
	$(BIN)/pytest -ra

setup: $(STAMP) frontend/vendor/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

frontend/vendor/.installed: frontend/package.json frontend/package-lock.json frontend/setup.sh
	bash frontend/setup.sh
	touch $@

# Test-only system tools: Chromium for browser tests, espeak-ng + sox to make test speech.
setup-system:
	@if ! command -v chromium >/dev/null || ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null; then \
		echo "installing chromium, espeak-ng, sox (apt)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium espeak-ng sox; \
	fi

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) frontend/node_modules frontend/vendor artifacts
