#!/usr/bin/env bash
# Make sure podman has the Dockerfile's base image, python:3.11-slim, without pulling it.
#
# Where an image registry is reachable, `podman pull python:3.11-slim` once is all it takes and
# this script then does nothing. Where none is (CI here), it builds a stand-in with mmdebstrap:
# Debian bookworm minbase with Python 3.11 and venv, as the official image has, tagged with the
# same name. The stand-in carries this machine's CA bundle, and PIP_CERT points at it, because
# this machine reaches the package index through a TLS proxy; none of that is in the
# Dockerfile. podman keeps the image, so it is built once per machine (about a minute).
set -euo pipefail

image=${DLR_BASE_IMAGE:-python:3.11-slim}
ca_bundle=${DLR_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
# This machine's own Debian sources, so the stand-in comes from the mirror apt already uses.
sources=${DLR_DEBIAN_SOURCES:-/etc/apt/sources.list.d/debian.sources}

if podman image exists "docker.io/library/$image"; then
  exit 0
fi

echo "building a local stand-in for $image with mmdebstrap (once per machine)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mirror_args=()
[ -f "$sources" ] && mirror_args=("$sources")

mmdebstrap --quiet --variant=minbase \
  --include=python3,python3-venv,python-is-python3,ca-certificates \
  --aptopt='Acquire::Check-Valid-Until "false"' \
  --customize-hook="copy-in $ca_bundle /etc/ssl/certs/" \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
  bookworm "$work/rootfs.tar" "${mirror_args[@]}"

podman import --quiet \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change "ENV PIP_CERT=/etc/ssl/certs/$(basename "$ca_bundle")" \
  --change "ENV SSL_CERT_FILE=/etc/ssl/certs/$(basename "$ca_bundle")" \
  --change 'CMD ["python3"]' \
  "$work/rootfs.tar" "docker.io/library/$image" >/dev/null
echo "stand-in $image ready"
