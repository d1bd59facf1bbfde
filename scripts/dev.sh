#!/usr/bin/env bash
# Command 1: bring up PostgreSQL, migrate, create the demo workspace, print a token and serve
# Offload on http://127.0.0.1:3000 (API, worker loop and scheduler) until Ctrl-C.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ensure_postgres
cd "$ROOT"
exec cargo run --release --bin offload -- dev
