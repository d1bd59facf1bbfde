#!/usr/bin/env bash
# Command 1: bring up PostgreSQL, build the dashboard, migrate, create the demo workspace, print
# a token and serve Offload on http://127.0.0.1:3000 (dashboard at /, API under /api/, worker
# loop and scheduler) until Ctrl-C. E-mail (send_email_batch) goes to a local SMTP sink on
# 127.0.0.1:1025 that keeps each message in .local/mail.jsonl.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ensure_postgres
ensure_python_tools
build_web
cd "$ROOT"
start_mail_sink
trap 'kill "$MAIL_PID" 2>/dev/null || true' EXIT
cargo run --release --bin offload -- dev
