#!/usr/bin/env bash
# Deployment with local data: an aggregator and three "hospitals", each a `dssgd worker` reading
# its own folder of CSV files (the built-in breast-cancer task), as separate processes.
#
#     bash examples/hospitals.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DSSGD="${DSSGD:-.venv/bin/python -m dssgd}"
RUN="hospitals-$(date +%H%M%S)"
DATA="$(mktemp -d)"
.venv/bin/python -c "from shared.builtin_tasks import write_csv_parts as w; w('$DATA', 3)"
$DSSGD aggregator --run-id "$RUN" --task breast-cancer --participants 3 --epochs 20 &
AGG=$!
trap 'kill $AGG 2>/dev/null || true' EXIT
WORKERS=()
for i in 0 1 2; do
    $DSSGD worker --run-id "$RUN" --participants "$i" --data "$DATA/p$i" &
    WORKERS+=($!)
done
wait "${WORKERS[@]}"
sleep 2  # the aggregator applies the last updates
$DSSGD status --run-id "$RUN"
$DSSGD delete "$RUN"
