#!/bin/sh
# Vendoring litequeue into an app, end to end:
#
#     sh examples/vendored_app/setup_and_run.sh [APP_DIR]      (default: a new temp dir)
#
# 1. "Install": copy litequeue.py and schema.sql (that is all of litequeue) into a fresh app
#    directory, next to the app's own tasks.py and enqueue.py.
# 2. Enqueue work with the app's own script.
# 3. Serve it with the vendored litequeue.py, from another directory and by absolute paths
#    only, as systemd or cron would; --burst returns once the queue is drained.
# 4. Look at the jobs and the status.
#
# PYTHON picks the interpreter (one with apsw, psutil and click installed).
set -eu

PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
CHECKOUT=$(cd "$HERE/../.." && pwd)
APP=${1:-$(mktemp -d "${TMPDIR:-/tmp}/litequeue-app.XXXXXX")}
mkdir -p "$APP"
APP=$(cd "$APP" && pwd)

echo "== 1. vendor litequeue into $APP"
cp "$CHECKOUT/litequeue.py" "$CHECKOUT/schema.sql" "$APP/"
cp "$HERE/tasks.py" "$HERE/enqueue.py" "$APP/"
ls "$APP"

# Nothing below depends on the working directory: the database and the app are given by
# absolute paths. LITEQUEUE_DB is the one setting the app and the command line share.
export LITEQUEUE_DB="$APP/queue.db"
cd /

echo "== 2. enqueue"
"$PYTHON" "$APP/enqueue.py"

echo "== 3. serve until drained"
"$PYTHON" "$APP/litequeue.py" serve --app "$APP/tasks.py" --db "$LITEQUEUE_DB" --burst \
    --memory-budget 512M --poll 0.1

echo "== 4. jobs and status"
"$PYTHON" "$APP/litequeue.py" jobs list --db "$LITEQUEUE_DB"
"$PYTHON" "$APP/litequeue.py" status --db "$LITEQUEUE_DB"
echo "alerts.log:"
cat "$APP/alerts.log"
