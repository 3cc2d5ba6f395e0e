# Two commands on a fresh Debian/Ubuntu machine with Python 3.11:
#   make run    set everything up and start the whole stack (no keys needed)
#   make test   set everything up and run the tests
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Tests run a real LiveKit server: a pinned release built with the ordinary Go client, into a
# project-local folder (never on PATH, never needed by `make run`).
LIVEKIT_VERSION := v1.13.5
LIVEKIT_BIN     := .cache/bin/livekit-server
# The Helm chart is rendered and validated by the tests with these, built the same way.
HELM_VERSION        := v3.16.4
KUBECONFORM_VERSION := v0.6.7

.PHONY: run test setup setup-system setup-livekit setup-deploy-tools frontend lint audit clean schema

run: setup
	$(BIN)/avatar-stack up

test: setup-system setup setup-livekit setup-deploy-tools
	$(BIN)/ruff check .
	$(BIN)/python -m common.schema --check
	$(BIN)/pytest -ra

# The protocol's JSON Schema and TypeScript types, from common/models.py (tests fail when they drift).
schema: $(STAMP)
	$(BIN)/python -m common.schema

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

# `go install` of v1.13.5 (v1.13.6+ carry `replace` directives and cannot be go-installed).
# Skipped when the binary is there and reports the pinned version. Without Go the LiveKit tests
# skip, except in CI (CI=true), where that is an error.
setup-livekit:
	@if $(LIVEKIT_BIN) --version 2>/dev/null | grep -qx "livekit-server version $(LIVEKIT_VERSION:v%=%)"; then \
		echo "livekit-server $(LIVEKIT_VERSION) already in $(LIVEKIT_BIN)"; \
	else \
		if ! command -v go >/dev/null; then \
			echo "setup-livekit: no Go (https://go.dev/dl) to build livekit-server: the LiveKit tests will skip"; \
			case "$${CI:-}" in true|1|yes) echo "setup-livekit: CI needs it"; exit 1;; esac; \
			exit 0; \
		fi; \
		mkdir -p .cache/gobin && \
		echo "building livekit-server $(LIVEKIT_VERSION) (go install; minutes the first time)" && \
		GOBIN=$(CURDIR)/.cache/gobin go install github.com/livekit/livekit-server/cmd/server@$(LIVEKIT_VERSION) && \
		mkdir -p $(dir $(LIVEKIT_BIN)) && mv .cache/gobin/server $(LIVEKIT_BIN) && \
		$(LIVEKIT_BIN) --version; \
	fi

# helm and kubeconform for tests/test_helm_chart.py, by `go install` into .cache/gobin/ (3 min the
# first time on 2 cores, nothing when the pinned versions are there). Without Go the chart test
# skips, except in CI (CI=true), where that is an error.
setup-deploy-tools:
	@for spec in helm.sh/helm/v3/cmd/helm@$(HELM_VERSION) github.com/yannh/kubeconform/cmd/kubeconform@$(KUBECONFORM_VERSION); do \
		pkg=$${spec%@*}; version=$${spec#*@}; bin=.cache/gobin/$$(basename $$pkg); \
		mod=$$(echo $$pkg | sed 's#/cmd/.*##'); \
		if command -v go >/dev/null && go version -m $$bin 2>/dev/null | grep -qE "^\s+mod\s+$$mod\s+$$version\s"; then \
			echo "$$(basename $$pkg) $$version already in $$bin"; continue; \
		fi; \
		if ! command -v go >/dev/null; then \
			echo "setup-deploy-tools: no Go (https://go.dev/dl) to build $$(basename $$pkg): the chart test will skip"; \
			case "$${CI:-}" in true|1|yes) echo "setup-deploy-tools: CI needs it"; exit 1;; esac; \
			continue; \
		fi; \
		echo "building $$(basename $$pkg) $$version (go install)"; \
		mkdir -p .cache/gobin && GOBIN=$(CURDIR)/.cache/gobin go install $$spec || exit 1; \
	done

lint: setup
	$(BIN)/ruff check .

# Known vulnerabilities in the installed dependencies (pip-audit, in a venv of its own so it never
# changes ours). Report-only: offline machines cannot reach the advisory database.
audit: setup
	test -x .venv-audit/bin/pip-audit || ($(PYTHON) -m venv .venv-audit && .venv-audit/bin/pip install --quiet pip-audit==2.10.1)
	-timeout 300 .venv-audit/bin/pip-audit --path "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" --progress-spinner off --desc on

clean:
	rm -rf $(VENV) .venv-audit frontend/node_modules artifacts .cache
