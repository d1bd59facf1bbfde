#!/usr/bin/env bash
# Command 2: the same set-up as dev.sh, then every check: format, clippy (warnings are errors),
# all tests against a real PostgreSQL and moto's SQS server, and cfn-lint on template.yaml.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ensure_postgres
ensure_python_tools
cd "$ROOT"

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

say "cfn-lint template.yaml"
cfn-lint template.yaml

start_moto
trap 'kill "$MOTO_PID" 2>/dev/null || true' EXIT

# Each test makes its own database from a migrated template; drop what earlier runs left.
psql "${DATABASE_URL%/*}/postgres" -Atqc \
  "SELECT 'DROP DATABASE IF EXISTS \"' || datname || '\" WITH (FORCE);' FROM pg_database WHERE datname LIKE 'offload_t_%'" \
  2>/dev/null | psql "${DATABASE_URL%/*}/postgres" -q >/dev/null 2>&1 || true

say "cargo test"
export OFFLOAD_TEST_DATABASE_URL="$DATABASE_URL"
cargo test --workspace --locked

cargo build -q --locked --bin offload --bin offload-soak

say "soak smoke run: 20 s, kills every ~6 s (the long run: scripts/soak.sh)"
target/debug/offload-soak --secs 20 --rate 20 --kill-every 6 --drain-secs 90 \
  --out target/soak-smoke.json

say "API fuzz smoke run (the long run: scripts/fuzz-api.sh)"
OFFLOAD_BIN="$ROOT/target/debug/offload" scripts/fuzz-api.sh --max-examples 15

say "benchmark smoke run (tiny sizes; the real figures: cargo run --release -p offload-bench)"
cargo run -q -p offload-bench -- --jobs 500 --repeat 1 --latency-jobs 20 --latency-rate 100 \
  --api-secs 1 --api-rate 100 --batches 2 --sqs-jobs 50 --import-rows 2000 \
  --out target/bench-smoke.json
cargo run -q -p offload-bench -- --only sustained --sustained-secs 10 --sustained-rate 200 \
  --sustained-retention-secs 2 --sustained-scheduler-secs 2 --sustained-sample-secs 1 \
  --out target/bench-smoke-sustained.json
