#!/usr/bin/env bash
# The regression gate for the hot path: builds the benchmark of each REF (a commit, branch
# or tag) in a worktree of its own, then runs the drain, the enterprise tier's drain and the
# create-to-start latency alternately with the working tree's build, several rounds, in the
# same minutes, and prints each figure's median per build and the ratio to the first REF.
# This machine swings by a third from one day to the next: only builds measured side by
# side, alternating, can be compared.
#
#   scripts/bench-compare.sh [--rounds N] [--jobs N] [--tiers T] REF [REF...]
#
# The worktrees and their shared build folder live in .local/bench-compare/ (reused by the
# next run); the JSON of every run goes to .local/bench-compare/runs/.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

rounds=3
jobs=20000
tiers=enterprise
refs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --tiers) tiers="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) refs+=("$1"); shift ;;
  esac
done
[ ${#refs[@]} -gt 0 ] || die "name the build to compare with: scripts/bench-compare.sh REF (e.g. origin/main or a commit)"

cd "$ROOT"
work="$LOCAL/bench-compare"
runs="$work/runs/$(date -u +%Y%m%dT%H%M%S)"
mkdir -p "$runs"

# label|binary for every build, the working tree last.
builds=()
for ref in "${refs[@]}"; do
  sha=$(git rev-parse --verify --quiet "$ref^{commit}") || die "$ref is not a commit here"
  short=${sha:0:9}
  tree="$work/tree-$short"
  if [ ! -d "$tree" ]; then
    say "worktree of $ref ($short) in $tree"
    git worktree add --detach --force "$tree" "$sha" >/dev/null
  fi
  # A commit's build never changes: one made by an earlier run is used as it is (the REFs
  # share one build folder, so building them again would rebuild each in turn).
  if [ ! -x "$work/offload-bench-$short" ]; then
    # Builds of the api binary embed the dashboard's build folder; the benchmark needs only
    # that it exists.
    mkdir -p "$tree/dashboard/dist"
    say "building the benchmark of $ref ($short)"
    (cd "$tree" && CARGO_TARGET_DIR="$work/target" cargo build -q --release --locked -p offload-bench)
    cp "$work/target/release/offload-bench" "$work/offload-bench-$short"
  fi
  builds+=("$ref|$work/offload-bench-$short")
done
say "building the benchmark of the working tree"
mkdir -p dashboard/dist
cargo build -q --release --locked -p offload-bench
cp target/release/offload-bench "$work/offload-bench-tree"
builds+=("tree|$work/offload-bench-tree")

ensure_postgres
server="${DATABASE_URL%/*}/postgres"

# The figures a build's benchmark knows (an old one may have no tiers figure).
figures_of() {
  local help only="drain,latency"
  help=$("$1" --help)
  if grep -q 'tiers' <<<"$help"; then only="tiers,$only"; fi
  printf '%s' "$only"
}

n=${#builds[@]}
for r in $(seq 1 "$rounds"); do
  # Each round starts with the next build, so none always runs first (on a cooler cache).
  for k in $(seq 0 $((n - 1))); do
    i=$(( (k + r - 1) % n ))
    IFS='|' read -r label bin <<<"${builds[$i]}"
    only=$(figures_of "$bin")
    extra=()
    [[ $only == tiers* ]] && extra=(--tiers "$tiers")
    say "round $r/$rounds: $label ($only)"
    RUST_LOG=warn DATABASE_URL="$server" "$bin" --only "$only" "${extra[@]}" --repeat 1 \
      --jobs "$jobs" --out "$runs/$i-$r.json" >/dev/null 2>"$runs/$i-$r.log" \
      || { cat "$runs/$i-$r.log" >&2; die "$label's benchmark failed (round $r)"; }
  done
done

labels=()
for b in "${builds[@]}"; do labels+=("${b%%|*}"); done
python3 - "$runs" "$rounds" "${labels[@]}" <<'PY'
import json, statistics, sys
runs, rounds, labels = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
want = ["drain_postgres"] + [f for f in ("drain_enterprise", "drain_standard", "drain_free",
        "drain_unlimited")] + ["latency_p50", "latency_p99"]
vals = {}
for i, label in enumerate(labels):
    for r in range(1, rounds + 1):
        with open(f"{runs}/{i}-{r}.json") as f:
            for fig in json.load(f)["figures"]:
                vals.setdefault(fig["name"], {}).setdefault(label, []).append(fig["value"])
names = [w for w in want if w in vals]
base = labels[0]
head = ["figure"] + labels + [f"{l}/{base}" for l in labels[1:]]
rows = []
for name in names:
    unit = "ms" if name.startswith("latency") else "jobs/s"
    row = [f"{name} ({unit})"]
    med = {}
    for l in labels:
        v = vals[name].get(l)
        if v:
            med[l] = statistics.median(v)
            row.append(f"{med[l]:,.0f}" if unit == "jobs/s" else f"{med[l]:.2f}")
            row[-1] += "  [" + " ".join(f"{x:.0f}" if unit == "jobs/s" else f"{x:.2f}" for x in v) + "]"
        else:
            row.append("-")
    for l in labels[1:]:
        row.append(f"{med[l] / med[base]:.2f}" if l in med and base in med and med[base] else "-")
    rows.append(row)
widths = [max(len(r[c]) for r in rows + [head]) for c in range(len(head))]
fmt = lambda r: "| " + " | ".join(x.ljust(w) for x, w in zip(r, widths)) + " |"
print(f"median of {rounds} alternating rounds (each run's figure in brackets)")
print(fmt(head))
print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
for r in rows:
    print(fmt(r))
PY
say "runs and their logs: $runs"
