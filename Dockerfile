# syntax=docker/dockerfile:1
# Multi-stage: build the virtualenv with the compilers' stage, run from a slim one as non-root.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv/dlr
RUN python -m venv /opt/venv
COPY pyproject.toml ./
# Dependencies first, against an empty package (and an empty readme), so that a change to the
# code or the README alone reuses this layer. Editable, so that the migrations beside the
# package are found at the same path at run time; the real package then replaces the empty one.
RUN mkdir app && touch app/__init__.py README.md && /opt/venv/bin/pip install -e . && rm -r app
COPY app ./app

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DLR_DATABASE_URL=sqlite:////data/dlr.db
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
