#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian machine, then runs them.
# System packages: redis-server, orthanc, dcmtk, dicom3tools, chromium (needs root for apt-get).
# Python: a venv in .venv with `pip install .[test,lint]`; ruff and mypy run first and fail on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends redis-server orthanc dcmtk dicom3tools chromium chromium-driver fonts-dejavu-core poppler-utils >/dev/null
else
  echo "not root: assuming redis-server, orthanc, dcmtk, dicom3tools and chromium are installed" >&2
fi
# Debian starts the packaged services; the tests run their own on free ports.
(systemctl stop orthanc redis-server 2>/dev/null || service orthanc stop 2>/dev/null || true) >/dev/null 2>&1
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q ".[test,lint]"
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -ra --timeout 900 "$@"
