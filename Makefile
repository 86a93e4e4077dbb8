# Two commands do all set-up on a fresh machine:
#   make run    create the venv, install what serving needs, migrate and serve on SQLite
#               (http://127.0.0.1:8000)
#   make test   create the venv, add the test tools, run ruff, mypy, lint-imports and the
#               whole suite (a throwaway PostgreSQL is started when none listens; see
#               tests/conftest.py)
# and one more for the image:
#   make container-test   build the Dockerfile with podman and run it (installs podman and
#                         mmdebstrap with apt-get when missing, as CI does)
# Every install comes from the committed lock files, as they are (docs/dependencies.md):
# requirements.lock (serving) and requirements-dev.lock (serving and the dev extra), pinned
# with hashes by uv pip compile.
#   make lock        after editing pyproject.toml's dependencies: re-resolve both, keeping pins
#   make lock-check  fail when the locks no longer match pyproject.toml (CI runs it first)
#   make upgrade     move every package to the newest release the bounds allow, then the suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# uv, the exact release that wrote the locks, installed from the package index with pip into
# a folder of its own (not the venv, which the dev sync keeps to what the lock lists).
UV_VERSION := 0.13.10
UV_DIR := .tools/uv-$(UV_VERSION)
UV := $(UV_DIR)/bin/uv
# uv never downloads an interpreter of its own: the venv is made from $(PYTHON).
export UV_PYTHON_DOWNLOADS := never
# One stamp per layer of the venv; each re-installs when pyproject.toml or its lock changes,
# otherwise a repeated make skips it.
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
# The locks: for CPython 3.11 (the image's), every file of each pinned release hashed, no
# index or file address in them; the header names `make lock` as the command that wrote them.
LOCK_FLAGS := --quiet --generate-hashes --python-version 3.11 --custom-compile-command 'make lock'

.PHONY: run test lock lock-check upgrade test-embedded-pg container-test container-tools \
	browser bench bench-tools clean

$(UV):
	$(PYTHON) -m pip install --quiet --no-warn-script-location --target $(UV_DIR) uv==$(UV_VERSION)

$(BIN)/python: | $(UV)
	$(UV) venv --quiet --python $(PYTHON) $(VENV)

# Serving's dependencies exactly as requirements.lock pins them (--require-hashes: every line
# must carry its hashes, and every file downloaded must match one), then the project itself,
# editable (changes under app/ need no reinstall) and --no-deps (its dependencies are the
# lock's). `install`, not `sync`: the test tools stay when make test put them there before.
$(RUN_STAMP): pyproject.toml requirements.lock | $(BIN)/python
	$(UV) pip install --python $(BIN)/python --require-hashes -r requirements.lock
	$(UV) pip install --python $(BIN)/python --no-deps -e .
	touch $@

# The venv made exactly requirements-dev.lock (sync removes whatever it does not list, the
# project included), then the project again, editable.
$(TEST_STAMP): pyproject.toml requirements-dev.lock | $(BIN)/python
	$(UV) pip sync --python $(BIN)/python --require-hashes requirements-dev.lock
	$(UV) pip install --python $(BIN)/python --no-deps -e .
	touch $@

# Both locks from pyproject.toml into the folder $(1), extra flags $(2) (--upgrade). uv keeps
# the pins of the lock already at the output path wherever pyproject.toml still allows them.
# The dev lock first; serving's is then resolved preferring the dev lock's pins (copied to its
# path first), so that the two pin every package they share to the same release.
define compile-locks
	$(UV) pip compile pyproject.toml $(LOCK_FLAGS) --extra dev $(2) -o $(1)/requirements-dev.lock
	cp $(1)/requirements-dev.lock $(1)/requirements.lock
	$(UV) pip compile pyproject.toml $(LOCK_FLAGS) -o $(1)/requirements.lock
endef

# Re-resolve into a scratch folder, starting from the committed locks (so nothing moves that
# pyproject.toml does not force), and fail on any difference: a dependency edited without
# `make lock`, or a lock edited by hand. Needs the package index. CI runs it first.
LOCK_CHECK_DIR := .tools/lock-check
lock-check: | $(UV)
	rm -rf $(LOCK_CHECK_DIR) && mkdir -p $(LOCK_CHECK_DIR)
	cp requirements-dev.lock $(LOCK_CHECK_DIR)/
	$(call compile-locks,$(LOCK_CHECK_DIR),)
	diff -u requirements-dev.lock $(LOCK_CHECK_DIR)/requirements-dev.lock
	diff -u requirements.lock $(LOCK_CHECK_DIR)/requirements.lock
	rm -rf $(LOCK_CHECK_DIR)
	@echo "requirements.lock and requirements-dev.lock match pyproject.toml"

lock: | $(UV)
	$(call compile-locks,.,)

# Newest releases within pyproject.toml's bounds, then the whole suite on them; commit both
# locks if it passes.
upgrade: | $(UV)
	$(call compile-locks,.,--upgrade)
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
# pytest runs as `python -m pytest`: the suite starts many writer child processes, and under
# `python -m` multiprocessing's children skip re-importing the pytest script.
test: $(TEST_STAMP) browser
	$(BIN)/ruff check app tests bench migrations
	$(BIN)/mypy --strict app
# The layer contracts of pyproject.toml's [tool.importlinter].
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -m 'not container' $(PYTEST_ARGS)

# Every PostgreSQL test against the throwaway server of tests/conftest.py, whatever runs on
# 5432: the admin URL points at a port where nothing listens (port 1).
test-embedded-pg: $(TEST_STAMP)
	DLR_TEST_PG_ADMIN=postgresql://postgres@127.0.0.1:1/postgres \
		$(BIN)/python -m pytest -m 'not container' -k postgresql $(PYTEST_ARGS)

# podman builds and runs the image (runc: crun refuses the hybrid cgroups of some VMs, see
# tests/container/containers.conf); mmdebstrap builds the stand-in base image where no image
# registry is reachable (tests/container/base-image.sh). Installing them needs root.
container-tools:
	@for tool in podman runc mmdebstrap; do command -v $$tool >/dev/null 2>&1 || missing=1; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq podman runc mmdebstrap >/dev/null; fi

container-test: $(TEST_STAMP) container-tools
	tests/container/base-image.sh
	DLR_CONTAINER_TEST_REQUIRED=1 $(BIN)/python -m pytest -m container \
		tests/deploy/test_container.py $(PYTEST_ARGS)

# wrk drives the load; a fresh machine lacks it (installing it needs root, as on CI).
bench-tools:
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }

bench: $(TEST_STAMP) bench-tools
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache .mypy_cache .import_linter_cache
