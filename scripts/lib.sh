# Shared by the scripts: start the machine's PostgreSQL (unless DATABASE_URL is set) and
# prepare the Python tools (moto's SQS server, cfn-lint) in a private virtualenv.
# Sourced, not run.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL="$ROOT/.local"
mkdir -p "$LOCAL"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Sets DATABASE_URL to a running server: the one given, or the machine's own cluster, started
# if it is stopped (Debian's pg_ctlcluster; PostgreSQL 15 on these machines).
ensure_postgres() {
  if [ -n "${DATABASE_URL:-}" ]; then
    say "using DATABASE_URL from the environment"
    return
  fi
  local url="postgres://postgres:postgres@127.0.0.1:5432/offload"
  if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then
    export DATABASE_URL="$url"
    say "PostgreSQL is already running on 127.0.0.1:5432"
    ensure_pg_stat_statements
    return
  fi
  if ! command -v pg_lsclusters >/dev/null; then
    die "PostgreSQL is not installed. Install it (Debian/Ubuntu: apt-get install postgresql; \
macOS: brew install postgresql@15 && brew services start postgresql@15) or set DATABASE_URL \
to a server you have, e.g. postgres://user:pass@host:5432/offload"
  fi
  local ver cluster
  read -r ver cluster _ < <(pg_lsclusters -h | head -n 1) || true
  [ -n "${ver:-}" ] || die "PostgreSQL is installed but has no cluster: run 'pg_createcluster 15 main'"
  say "starting PostgreSQL $ver/$cluster"
  as_root pg_conftool "$ver" "$cluster" set shared_preload_libraries pg_stat_statements || true
  if [ "$(id -u)" = 0 ]; then
    pg_ctlcluster "$ver" "$cluster" start || true
  else
    sudo -n pg_ctlcluster "$ver" "$cluster" start || pg_ctlcluster "$ver" "$cluster" start || true
  fi
  for _ in $(seq 1 30); do
    pg_isready -q -h 127.0.0.1 -p 5432 && break
    sleep 0.5
  done
  pg_isready -q -h 127.0.0.1 -p 5432 || die "PostgreSQL did not start; see /var/log/postgresql/"
  # The local superuser gets the well-known development password so TCP logins work.
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- psql -q -c "ALTER USER postgres PASSWORD 'postgres'" >/dev/null
  else
    sudo -n -u postgres psql -q -c "ALTER USER postgres PASSWORD 'postgres'" >/dev/null 2>&1 || true
  fi
  export DATABASE_URL="$url"
}

# Runs a command as root: directly, or through passwordless sudo.
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}

# pg_stat_statements counts what the database runs: the realtime tests check with it
# that idle viewers cost no statement, and benchmarks read where time goes. A local
# cluster of this machine that runs without it is given it and restarted; a server
# named by DATABASE_URL is left as it is.
ensure_pg_stat_statements() {
  command -v pg_lsclusters >/dev/null || return 0
  local loaded
  loaded=$(PGPASSWORD=postgres psql -h 127.0.0.1 -U postgres -d postgres -Atc \
    "SHOW shared_preload_libraries" 2>/dev/null) || return 0
  case "$loaded" in *pg_stat_statements*) return 0 ;; esac
  local ver cluster
  read -r ver cluster _ < <(pg_lsclusters -h | head -n 1) || return 0
  say "loading pg_stat_statements into PostgreSQL $ver/$cluster (a restart)"
  as_root pg_conftool "$ver" "$cluster" set shared_preload_libraries pg_stat_statements \
    && as_root pg_ctlcluster "$ver" "$cluster" restart || {
      say "could not load pg_stat_statements (no root); the realtime tests need it"
      return 0
    }
  for _ in $(seq 1 30); do
    pg_isready -q -h 127.0.0.1 -p 5432 && break
    sleep 0.5
  done
}

# Puts moto (SQS API server) and cfn-lint in $LOCAL/venv and on PATH.
ensure_python_tools() {
  local venv="$LOCAL/venv"
  if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv"
    python3 -m venv "$venv" || die "python3 with venv is needed (apt-get install python3-venv)"
  fi
  if ! "$venv/bin/python" -c 'import moto.server, cfnlint, flask_cors, schemathesis, aiosmtpd' 2>/dev/null; then
    say "installing moto[server], cfn-lint, schemathesis and aiosmtpd from PyPI"
    "$venv/bin/pip" install -q --disable-pip-version-check 'moto[server]>=5,<6' 'cfn-lint>=1,<2' \
      'schemathesis>=4,<5' 'aiosmtpd>=1.4,<2'
  fi
  export PATH="$venv/bin:$PATH"
}

# Puts the Lambda build tools in $LOCAL/venv and on PATH: cargo-lambda and zig (the
# cross-linker it drives), and the AWS SAM CLI; adds Rust's arm64 Linux target.
ensure_lambda_tools() {
  ensure_python_tools
  local venv="$LOCAL/venv"
  if ! [ -x "$venv/bin/cargo-lambda" ] || ! [ -x "$venv/bin/sam" ] \
    || ! "$venv/bin/python" -c 'import ziglang' 2>/dev/null; then
    say "installing cargo-lambda, ziglang and aws-sam-cli from PyPI"
    "$venv/bin/pip" install -q --disable-pip-version-check 'cargo-lambda>=1,<2' 'ziglang>=0.13,<1' \
      'aws-sam-cli>=1.100,<2'
  fi
  if ! rustup target list --installed | grep -qx aarch64-unknown-linux-gnu; then
    say "adding Rust's aarch64-unknown-linux-gnu target"
    rustup target add aarch64-unknown-linux-gnu
  fi
}

# A TCP port nobody listens on, on loopback.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Starts moto's server on a free loopback port; exports OFFLOAD_TEST_SQS_ENDPOINT and MOTO_PID.
start_moto() {
  local port
  port=$(free_port)
  "$LOCAL/venv/bin/python" -m moto.server -H 127.0.0.1 -p "$port" >"$LOCAL/moto.log" 2>&1 &
  MOTO_PID=$!
  for _ in $(seq 1 60); do
    if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/moto-api/')" 2>/dev/null; then
      export OFFLOAD_TEST_SQS_ENDPOINT="http://127.0.0.1:$port"
      say "moto SQS server on $OFFLOAD_TEST_SQS_ENDPOINT"
      return
    fi
    sleep 0.5
  done
  die "moto's server did not start; see $LOCAL/moto.log"
}

# The SMTP sink of `offload dev` on 127.0.0.1:1025 (OFFLOAD_EMAIL_TRANSPORT's default), unless
# something already listens there: each message is a JSON line in $LOCAL/mail.jsonl.
start_mail_sink() {
  MAIL_PID=""
  if python3 -c "import socket; socket.create_connection(('127.0.0.1', 1025), 0.5)" 2>/dev/null; then
    say "something already listens on 127.0.0.1:1025; e-mail goes there"
    return
  fi
  "$LOCAL/venv/bin/python" "$ROOT/scripts/smtp_sink.py" --port 1025 --out "$LOCAL/mail.jsonl" \
    >"$LOCAL/mail-sink.log" 2>&1 &
  MAIL_PID=$!
  say "e-mail: SMTP sink on 127.0.0.1:1025, messages in $LOCAL/mail.jsonl"
}

# Installs the web packages (npm ci, from package-lock.json) and builds the TypeScript client
# (generated from the API's OpenAPI document) and the dashboard into dashboard/dist, which the
# api binary serves at /.
build_web() {
  command -v npm >/dev/null || die "Node.js 20 or later with npm is needed (apt-get install nodejs npm)"
  say "npm ci; the TypeScript client (from the OpenAPI document) and the dashboard"
  (cd "$ROOT" && npm ci --no-audit --no-fund --loglevel=error)
  # The folder exists before any Rust build: the api binary embeds it (see shared/build.rs).
  mkdir -p "$ROOT/dashboard/dist"
  (cd "$ROOT" && cargo run -q --locked --bin offload-openapi >clients/typescript/openapi.json)
  (cd "$ROOT" && npm run -s build -w clients/typescript && npm run -s build -w dashboard)
}

# Debian's Chromium, for the dashboard's browser tests (no browser download at run time).
ensure_chromium() {
  [ -x /usr/bin/chromium ] && return
  say "installing Debian's chromium"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  $sudo apt-get install -y -q chromium >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q chromium >/dev/null; } \
    || die "could not install chromium (apt-get install chromium)"
}
