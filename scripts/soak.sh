#!/usr/bin/env bash
# The soak: `offload dev` under a steady stream of mixed jobs for ten minutes while it is
# SIGKILLed and restarted, its webhook receiver fails and stalls at random, and some jobs are
# meant to die. Prints processed / retried / dead / lost / duplicated / p99 wait, writes
# target/soak-results.json, and exits non-zero if any job was lost or any effect repeated.
#   scripts/soak.sh                                  the long run (600 s at 30 jobs/s)
#   scripts/soak.sh --secs 60 --rate 50              any options of offload-soak (--help)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ensure_postgres
cd "$ROOT"
cargo build -q --release --bin offload --bin offload-soak
exec target/release/offload-soak "$@"
