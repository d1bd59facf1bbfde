#!/usr/bin/env bash
# Command 2: the same set-up as dev.sh, then every check: format, clippy (warnings are errors),
# all tests against a real PostgreSQL and moto's SQS server, the TypeScript client's tests and
# the dashboard's in Chromium, cfn-lint on template.yaml, the
# Lambda functions built for arm64 as SAM builds them, and `sam validate --lint`.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ensure_postgres
ensure_python_tools
cd "$ROOT"
# The dashboard is compiled into the api binary: build it before any Rust build.
build_web

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

say "TypeScript client tests"
npm test -s -w clients/typescript

say "dashboard in Chromium (screenshots: test-output/dashboard/)"
cargo build -q --locked --bin offload
scripts/e2e.sh

say "Lambda builds: cargo lambda build --release --arm64, as sam build makes them"
ensure_lambda_tools
cargo lambda build --release --arm64 --locked --bin api --bin worker --bin scheduler --bin migrate --bin realtime
python3 - <<'PY'
import os, sys
for f in ("api", "worker", "scheduler", "migrate", "realtime"):
    path = f"target/lambda/{f}/bootstrap"
    with open(path, "rb") as b:
        head = b.read(20)
    machine = int.from_bytes(head[18:20], "little")
    if head[:4] != b"\x7fELF" or machine != 183:
        sys.exit(f"{path} is not an arm64 Linux executable (ELF machine {machine})")
    print(f"  {path}: arm64 ELF, {os.path.getsize(path) / 2**20:.1f} MiB")
PY

say "sam validate --lint"
AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}" SAM_CLI_TELEMETRY=0 sam validate --lint
say "SAM transform of template.yaml, as at deploy time"
AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}" python scripts/sam-transform.py

cargo build -q --locked --bin offload --bin offload-soak

say "soak smoke run: 20 s, kills every ~6 s (the long run: scripts/soak.sh)"
target/debug/offload-soak --secs 20 --rate 20 --kill-every 6 --drain-secs 90 \
  --out target/soak-smoke.json

say "API fuzz smoke run (the long run: scripts/fuzz-api.sh)"
OFFLOAD_BIN="$ROOT/target/debug/offload" scripts/fuzz-api.sh --max-examples 15

say "benchmark smoke run (tiny sizes; the real figures: cargo run --release -p offload-bench)"
cargo run -q -p offload-bench -- --jobs 500 --repeat 1 --latency-jobs 20 --latency-rate 100 \
  --api-secs 1 --api-rate 100 --batches 2 --sqs-jobs 50 --import-rows 2000 --enrich-contacts 100 --crm-records 200 \
  --out target/bench-smoke.json
cargo run -q -p offload-bench -- --only sustained --sustained-secs 10 --sustained-rate 200 \
  --sustained-retention-secs 2 --sustained-scheduler-secs 2 --sustained-sample-secs 1 \
  --out target/bench-smoke-sustained.json
cargo run -q -p offload-bench -- --only stats --stats-jobs 2000 --out target/bench-smoke-stats.json
cargo run -q -p offload-bench -- --only workflows --fan-out-children 200 --repeat 1 \
  --stream-readers 20 --stream-chunks 20 --token-waits 10 --out target/bench-smoke-workflows.json
cargo run -q -p offload-bench -- --only realtime --realtime-viewers 50 --realtime-writes 5 \
  --realtime-interval-ms 20 --realtime-idle-secs 3 --realtime-pollers 5 --out target/bench-smoke-realtime.json
