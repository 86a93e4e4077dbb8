# syntax=docker/dockerfile:1
# Multi-stage: build the virtualenv with the compilers' stage, run from a slim one as non-root.
FROM python:3.11-slim AS build
# uv, the release the Makefile pins (UV_VERSION there), from the package index with pip, in a
# venv of its own that the final image leaves behind; the service's venv is /opt/venv.
ARG UV_VERSION=0.13.10
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
RUN python -m venv /opt/uv && /opt/uv/bin/pip install --no-cache-dir "uv==${UV_VERSION}" \
    && /opt/uv/bin/uv venv --quiet --python python /opt/venv
WORKDIR /srv/dlr
# Dependencies first, from the lock alone, so that a change to the code, the README or
# pyproject.toml's other tables reuses this layer: serving's (no dev extra), exactly as
# requirements.lock pins them, every download checked against the lock's hashes. (CI's
# `make lock-check` fails first when the lock no longer matches pyproject.toml.)
COPY requirements.lock ./
RUN /opt/uv/bin/uv pip sync --python /opt/venv/bin/python --require-hashes requirements.lock
# Then the project, editable, so that the migrations beside the package are found at the same
# path at run time (an empty README: its text is not needed to serve); --no-deps: its
# dependencies are the lock's, installed above.
COPY pyproject.toml ./
COPY app ./app
RUN touch README.md && /opt/uv/bin/uv pip install --python /opt/venv/bin/python --no-deps -e .

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DLR_DATABASE_URL=sqlite:////data/dlr.db \
    DLR_SPOOL_PATH=/data/spool.db
RUN groupadd --system --gid 10001 dlr && useradd --system --uid 10001 --gid dlr --home-dir /srv/dlr dlr \
    && mkdir /data && chown dlr:dlr /data
WORKDIR /srv/dlr
COPY --from=build /opt/venv /opt/venv
COPY --from=build /srv/dlr /srv/dlr
COPY alembic.ini ./
COPY migrations ./migrations
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
# Exec form: dlr is PID 1 and gets SIGTERM itself, so batches in flight finish and are answered.
STOPSIGNAL SIGTERM
ENTRYPOINT ["dlr", "serve", "--host", "0.0.0.0", "--port", "8000"]
