#!/usr/bin/env bash
# Fuzzes the API from its own OpenAPI document with schemathesis, against `offload dev` on a
# free loopback port and a database of its own. Passes: no 5xx, every error a problem body.
#   scripts/fuzz-api.sh                        the long run (10 minutes of fuzzing)
#   scripts/fuzz-api.sh --max-examples 15      the smoke form the test command runs
# Extra arguments go to `schemathesis run`.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ensure_postgres
ensure_python_tools
cd "$ROOT"

args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(--max-time 600)
fi

if [ -n "${OFFLOAD_BIN:-}" ]; then
  bin="$OFFLOAD_BIN"
else
  cargo build -q --release --bin offload
  bin="$ROOT/target/release/offload"
fi

db="offload_fuzz_$$"
port=$(free_port)
log="$LOCAL/fuzz-offload.log"
DATABASE_URL="${DATABASE_URL%/*}/$db" OFFLOAD_BIND="127.0.0.1:$port" RUST_LOG=warn \
  "$bin" dev >"$LOCAL/fuzz-offload.env" 2>"$log" &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  psql "${DATABASE_URL%/*}/postgres" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT

for _ in $(seq 1 100); do
  grep -q '^export OFFLOAD_TOKEN=' "$LOCAL/fuzz-offload.env" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; die "offload dev did not start"; }
  sleep 0.1
done
# shellcheck disable=SC1090
source <(grep '^export ' "$LOCAL/fuzz-offload.env")

# A job and a schedule for the routes that take an id, so they are fuzzed past the 404.
api() {
  curl -sf -X "$1" "$OFFLOAD_URL/api/workspaces/$OFFLOAD_WORKSPACE/$2" \
    -H "Authorization: Bearer $OFFLOAD_TOKEN" -H 'Content-Type: application/json' -d "$3"
}
id_of() { python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'; }
OFFLOAD_FUZZ_JOB=$(api POST jobs '{"type":"sleep","payload":{"ms":1},"run_at":"'"$(date -u -d "+300 days" +%Y-%m-%dT%H:%M:%SZ)"'"}' | id_of)
OFFLOAD_FUZZ_SCHEDULE=$(api POST schedules '{"name":"fuzz","cron":"0 3 * * *","type":"noop"}' | id_of)
# A finished job for the stream, which otherwise follows a job for 25 s per request.
OFFLOAD_FUZZ_DONE_JOB=$(api POST jobs '{"type":"noop"}' | id_of)
for _ in $(seq 1 100); do
  api GET "jobs/$OFFLOAD_FUZZ_DONE_JOB" '' | grep -q '"status":"completed"' && break
  sleep 0.1
done
export OFFLOAD_FUZZ_JOB OFFLOAD_FUZZ_SCHEDULE OFFLOAD_FUZZ_DONE_JOB
say "fuzzing $OFFLOAD_URL/api/openapi.json (workspace $OFFLOAD_WORKSPACE)"

# Schemathesis and hypothesis keep their caches in the working directory: keep them in .local.
cd "$LOCAL"
export SCHEMATHESIS_HOOKS=offload_checks
export PYTHONPATH="$ROOT/scripts/fuzz${PYTHONPATH:+:$PYTHONPATH}"
schemathesis --config-file "$ROOT/scripts/fuzz/schemathesis.toml" run \
  "$OFFLOAD_URL/api/openapi.json" \
  --header "Authorization: Bearer $OFFLOAD_TOKEN" \
  --checks not_a_server_error,problem_bodies \
  --workers 1 --no-color \
  "${args[@]}"
kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; die "offload dev died during the run"; }
