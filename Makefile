# Two commands do all set-up on a fresh machine:
#   make run    create the venv, install what serving needs, migrate and serve on SQLite
#               (http://127.0.0.1:8000)
#   make test   create the venv, add the test tools, run ruff, mypy and the whole suite (a
#               throwaway PostgreSQL is started when none listens; see tests/conftest.py)
# and one more for the image:
#   make container-test   build the Dockerfile with podman and run it (installs podman and
#                         mmdebstrap with apt-get when missing, as CI does)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# One stamp per layer of the venv: serving first, the test tools on top of it.
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test test-embedded-pg container-test container-tools browser bench bench-tools clean

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(TEST_STAMP): $(RUN_STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

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
	$(BIN)/ruff check app tests bench migrations
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
	DLR_CONTAINER_TEST_REQUIRED=1 $(BIN)/pytest -m container tests/test_container.py $(PYTEST_ARGS)

# wrk drives the load; a fresh machine lacks it (installing it needs root, as on CI).
bench-tools:
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }

bench: $(TEST_STAMP) bench-tools
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
