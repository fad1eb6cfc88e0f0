#!/usr/bin/env bash
# Install (idempotent, fast when nothing changed), then run the test suite.
# Arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

bash scripts/install.sh

status=0
.venv/bin/pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test: error: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
