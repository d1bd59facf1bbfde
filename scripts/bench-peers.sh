#!/usr/bin/env bash
# Measures two peer job systems on this machine, against the same PostgreSQL as
# Offload's own benchmark (cargo run --release -p offload-bench), so the figures
# compare: graphile-worker (Node; bench/peers/graphile) and apalis with its
# PostgreSQL storage (Rust; bench/peers/apalis). For each peer and each of R
# rounds: a fresh database, one round of the peer's harness, the database
# dropped. Figures per peer (see each harness's header for the exact calls):
#   enqueue  B calls that each add 1000 no-op jobs in one call, jobs/s (and the p50 call)
#   drain    N queued no-op jobs drained by a worker with batching options, jobs/s
#            (graphile also without them: graphile_drain_plain)
# Per-round lines go to stderr; the median of the rounds, one `name value unit`
# line per figure, to stdout.
#
#   scripts/bench-peers.sh [--jobs N] [--repeat R] [--batches B] [--only graphile,apalis]
#
# DATABASE_URL names the server (default postgres://postgres:postgres@127.0.0.1:5432/postgres);
# the peers' databases are made and dropped on it. Installs what it needs under
# .local/peers/: graphile-worker from bench/peers/graphile/package-lock.json (npm ci)
# and the apalis harness (cargo build --release --locked, its own target directory).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

JOBS=20000 REPEAT=3 BATCHES=20 ONLY=graphile,apalis
while [ $# -gt 0 ]; do
  case "$1" in
    --jobs) JOBS=$2; shift 2 ;;
    --repeat) REPEAT=$2; shift 2 ;;
    --batches) BATCHES=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (try --help)" ;;
  esac
done
for n in "$JOBS" "$REPEAT" "$BATCHES"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "--jobs, --repeat and --batches take a positive number, not '$n'"
done
IFS=, read -r -a PEERS <<<"$ONLY"
for p in "${PEERS[@]}"; do
  case "$p" in graphile|apalis) ;; *) die "--only takes graphile and/or apalis, not '$p'" ;; esac
done

need() { command -v "$1" >/dev/null || die "$1 is missing: $2"; }
need psql "the PostgreSQL client is needed (apt-get install postgresql-client)"
need timeout "coreutils' timeout is needed"
for p in "${PEERS[@]}"; do
  case "$p" in
    graphile) need node "Node.js 20 or later is needed for graphile-worker (apt-get install nodejs npm)"
              need npm "npm is needed for graphile-worker (apt-get install npm)" ;;
    apalis) need cargo "Rust's cargo is needed for apalis (https://rustup.rs)" ;;
  esac
done

# The server: DATABASE_URL, or this machine's own cluster (started if stopped).
if [ -z "${DATABASE_URL:-}" ] && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  ensure_postgres
fi
SERVER="${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"
# $SERVER with its database name swapped for $1 (any ?query kept).
with_db() {
  local base="${SERVER%%\?*}" query=""
  [[ "$SERVER" == *\?* ]] && query="?${SERVER#*\?}"
  [[ "${base#*://}" == */* ]] || base="$base/"
  printf '%s/%s%s' "${base%/*}" "$1" "$query"
}
ADMIN=$(with_db postgres)
admin() { PGOPTIONS="-c client_min_messages=warning" psql "$ADMIN" -v ON_ERROR_STOP=1 -qAtc "$1" >/dev/null; }
admin "SELECT 1" 2>/dev/null || die "cannot reach PostgreSQL at $(sed "s#//[^@/]*@#//…@#" <<<"$ADMIN") (set DATABASE_URL)"

PEERS_DIR="$LOCAL/peers"
mkdir -p "$PEERS_DIR"

install_graphile() {
  local src="$ROOT/bench/peers/graphile" dst="$PEERS_DIR/graphile"
  mkdir -p "$dst"
  if ! cmp -s "$src/package-lock.json" "$dst/package-lock.json" \
    || [ ! -d "$dst/node_modules/graphile-worker" ]; then
    say "installing graphile-worker into $dst (npm ci)"
    cp "$src/package.json" "$src/package-lock.json" "$dst/"
    (cd "$dst" && npm ci --no-audit --no-fund --loglevel=error >&2) \
      || { rm -f "$dst/package-lock.json"; die "npm ci of graphile-worker failed"; }
  fi
  cp "$src/bench.mjs" "$dst/"
}

install_apalis() {
  say "building the apalis harness (cargo build --release; quick when up to date)"
  CARGO_TARGET_DIR="$PEERS_DIR/apalis-target" cargo build --release --locked --quiet \
    --manifest-path "$ROOT/bench/peers/apalis/Cargo.toml" || die "the apalis harness did not build"
}

# One round of peer $1 in database $2's URL: its figures on stdout.
run_peer() {
  local sizes=(--url "$2" --jobs "$JOBS" --batches "$BATCHES")
  case "$1" in
    graphile) (cd "$PEERS_DIR/graphile" && timeout 900 node bench.mjs "${sizes[@]}") ;;
    apalis) timeout 900 "$PEERS_DIR/apalis-target/release/peer-apalis" "${sizes[@]}" ;;
  esac
}

DB=""
RESULTS=$(mktemp)
cleanup() {
  [ -z "$DB" ] || admin "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true
  rm -f "$RESULTS"
}
trap cleanup EXIT
for p in "${PEERS[@]}"; do
  "install_$p"
  say "$p: $REPEAT rounds; $JOBS jobs per drain, $BATCHES batches of 1000 per enqueue figure"
  for r in $(seq 1 "$REPEAT"); do
    DB="peer_${p}_$$"
    admin "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
    admin "CREATE DATABASE $DB"
    out=$(run_peer "$p" "$(with_db "$DB")") || die "$p round $r failed (see above)"
    admin "DROP DATABASE $DB WITH (FORCE)"
    DB=""
    sed "s/^/  $p round $r: /" <<<"$out" >&2
    printf '%s\n' "$out" >>"$RESULTS"
  done
done

# The median of the rounds per figure (the upper one for an even count, as
# offload-bench does), in the order the figures came.
awk '{ if (!($1 in n)) order[++k] = $1; v[$1, ++n[$1]] = $2 + 0; unit[$1] = $3 }
  END {
    for (i = 1; i <= k; i++) {
      f = order[i]; m = n[f]
      for (a = 2; a <= m; a++) for (b = a; b > 1 && v[f, b - 1] > v[f, b]; b--) {
        t = v[f, b]; v[f, b] = v[f, b - 1]; v[f, b - 1] = t
      }
      printf "%s %.2f %s\n", f, v[f, int(m / 2) + 1], unit[f]
    }
  }' "$RESULTS"
