#!/usr/bin/env bash
# Command 1: bring up PostgreSQL, build the dashboard, migrate, create the demo workspace, print
# a token and serve Offload on http://127.0.0.1:3000 (dashboard at /, API under /api/, worker
# loop and scheduler) until Ctrl-C.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ensure_postgres
build_web
cd "$ROOT"
exec cargo run --release --bin offload -- dev
