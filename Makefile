# Two commands do all set-up on a fresh machine:
#   make run    create the venv, install what serving needs, migrate and serve on SQLite
#               (http://127.0.0.1:8000)
#   make test   create the venv, add the test tools, run ruff, mypy and the whole suite (a
#               throwaway PostgreSQL is started when none listens; see tests/conftest.py)
# and one more for the image:
#   make container-test   build the Dockerfile with podman and run it (installs podman and
#                         mmdebstrap with apt-get when missing, as CI does)
# Every install comes from uv.lock, as it is committed (docs/dependencies.md):
#   make lock       after editing pyproject.toml's dependencies: re-resolve into uv.lock
#   make upgrade    move every package to the newest release the bounds allow, then the suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# uv, the exact release that wrote uv.lock, installed from the package index with pip into a
# folder of its own (not the venv, which uv sync keeps to what the lock lists).
UV_VERSION := 0.13.10
UV_DIR := .tools/uv-$(UV_VERSION)
UV := $(UV_DIR)/bin/uv
# uv's venv is $(VENV), made from $(PYTHON); uv never downloads an interpreter of its own.
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never
# One stamp per layer of the venv: serving first, the test tools (the dev extra) on top of it.
# Each re-syncs when pyproject.toml or uv.lock changes; otherwise a repeated make skips it.
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test lock lock-check upgrade test-embedded-pg container-test container-tools \
	browser bench bench-tools clean

$(UV):
	$(PYTHON) -m pip install --quiet --no-warn-script-location --target $(UV_DIR) uv==$(UV_VERSION)

# --locked: install exactly what uv.lock says, and fail if it no longer matches pyproject.toml.
# The project itself goes in editable, so changes under app/ need no reinstall. --inexact
# leaves the test tools in place when make test installed them before.
$(RUN_STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --inexact
	touch $@

$(TEST_STAMP): $(RUN_STAMP)
	$(UV) sync --locked --extra dev
	touch $@

# Fails when uv.lock and pyproject.toml disagree (CI runs it first, and make test again).
lock-check: | $(UV)
	$(UV) lock --check

lock: | $(UV)
	$(UV) lock

# Newest releases within pyproject.toml's bounds, then the whole suite on them; commit uv.lock
# if it passes.
upgrade: | $(UV)
	$(UV) lock --upgrade
	$(MAKE) test

run: $(RUN_STAMP)
	$(BIN)/dlr serve --host $${HOST:-127.0.0.1} --port $${PORT:-8000}

# The dashboard's end-to-end test drives Debian's Chromium (Playwright's own browser
# download is not used), with a colour emoji font for the replies it shows; installing them
# needs root, as on CI.
browser:
	@{ command -v chromium >/dev/null 2>&1 && dpkg -s fonts-noto-color-emoji >/dev/null 2>&1; } || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		chromium fonts-noto-color-emoji >/dev/null; }

# The container tests have their own target (they need podman and take minutes).
test: $(TEST_STAMP) browser
	$(UV) lock --check
	$(BIN)/ruff check app tests bench migrations
# Further checks of the code (lint-imports, say) go here, between ruff and mypy.
	$(BIN)/mypy --strict app
	$(BIN)/pytest -m 'not container' $(PYTEST_ARGS)

# Every PostgreSQL test against the throwaway server of tests/conftest.py, whatever runs on
# 5432: the admin URL points at a port where nothing listens (port 1).
test-embedded-pg: $(TEST_STAMP)
	DLR_TEST_PG_ADMIN=postgresql://postgres@127.0.0.1:1/postgres \
		$(BIN)/pytest -m 'not container' -k postgresql $(PYTEST_ARGS)

# podman builds and runs the image (runc: crun refuses the hybrid cgroups of some VMs, see
# tests/container/containers.conf); mmdebstrap builds the stand-in base image where no image
# registry is reachable (tests/container/base-image.sh). Installing them needs root.
container-tools:
	@for tool in podman runc mmdebstrap; do command -v $$tool >/dev/null 2>&1 || missing=1; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq podman runc mmdebstrap >/dev/null; fi

container-test: $(TEST_STAMP) container-tools
	tests/container/base-image.sh
	DLR_CONTAINER_TEST_REQUIRED=1 $(BIN)/pytest -m container tests/deploy/test_container.py $(PYTEST_ARGS)

# wrk drives the load; a fresh machine lacks it (installing it needs root, as on CI).
bench-tools:
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }

bench: $(TEST_STAMP) bench-tools
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache .mypy_cache
