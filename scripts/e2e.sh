#!/usr/bin/env bash
# The dashboard's browser tests: `offload dev` on its own database and port (webhooks to
# loopback allowed, for the test's receiver), then dashboard/e2e in Debian's Chromium.
# Expects the web build (build_web) and target/debug/offload; scripts/test.sh runs it.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ensure_postgres
ensure_chromium
cd "$ROOT"

db="offload_e2e"
server="${DATABASE_URL%/*}"
psql "$server/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
out="$(mktemp)"
export OFFLOAD_JWT_SECRET="offload-e2e-secret-offload-e2e-secret"
OFFLOAD_BIND=127.0.0.1:3199 DATABASE_URL="$server/$db" OFFLOAD_WEBHOOK_ALLOW_PRIVATE=true \
  RUST_LOG=warn target/debug/offload dev >"$out" 2>"$out.err" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -f "$out" "$out.err"' EXIT
for _ in $(seq 1 120); do
  grep -q '^export OFFLOAD_TOKEN=' "$out" && break
  kill -0 "$pid" 2>/dev/null || { cat "$out.err" >&2; die "offload dev stopped"; }
  sleep 0.5
done
eval "$(grep '^export ' "$out")"
[ -n "${OFFLOAD_TOKEN:-}" ] || die "offload dev printed no token"
# A token that expires now: the last test waits out the API's clock-skew allowance.
export OFFLOAD_EXPIRING_AT="$(( $(date +%s) + 1 ))"
export OFFLOAD_EXPIRING_TOKEN="$(target/debug/offload token --workspace "$OFFLOAD_WORKSPACE" \
  --user 0ff10ad0-0000-4000-8000-0000000000a1 --ttl 1s)"
export SCREENSHOTS="$ROOT/test-output/dashboard"
export CHROMIUM=/usr/bin/chromium
# Bounded: a browser or a test that hangs fails the run in 15 minutes instead of holding CI.
status=0
timeout -k 10 900 npm run -s e2e -w dashboard || status=$?
if [ "$status" -ne 0 ]; then
  [ "$status" -ne 124 ] || echo "error: the browser tests did not finish within 15 minutes" >&2
  echo "--- offload dev's log (last 60 lines)" >&2
  tail -n 60 "$out.err" >&2
  exit "$status"
fi
