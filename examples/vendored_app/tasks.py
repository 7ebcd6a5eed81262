"""An app's tasks, with litequeue vendored: litequeue.py and schema.sql sit next to this file.

A small edge-device app: it summarizes sensor readings, raises alerts, uploads a backlog in
checkpointed batches and does some housekeeping. Serve it with

    python /opt/app/litequeue.py serve --app /opt/app/tasks.py --db /var/lib/app/queue.db
"""

import json
import os
import time

from litequeue import Queue            # the vendored copy, next to this file

HERE = os.path.dirname(os.path.abspath(__file__))

# One database for the app. $LITEQUEUE_DB overrides the default, as it does for the
# command line: set it where the app directory is read-only (see litequeue.service).
queue = Queue(os.environ.get("LITEQUEUE_DB") or os.path.join(HERE, "queue.db"))
# Where the app writes its own output: beside the database, which is writable.
DATA_DIR = os.path.dirname(os.path.abspath(queue.path))


@queue.task(priority="high", max_attempts=5, timeout=30)
def alert(ctx, sensor, value, threshold):
    """Never shed, first to run: record that a sensor crossed its threshold."""
    line = {"sensor": sensor, "value": value, "threshold": threshold, "job": ctx.job_id}
    with open(os.path.join(DATA_DIR, "alerts.log"), "a") as f:
        f.write(json.dumps(line) + "\n")
    return {"alerted": sensor}


@queue.task                               # defaults: normal priority, 3 attempts
def summarize(ctx, sensor, readings):
    """The stored result is the summary: JSON in, JSON out."""
    return {"sensor": sensor, "count": len(readings), "max": max(readings),
            "mean": round(sum(readings) / len(readings), 2)}


@queue.task(memory_limit="200M", timeout=600)
def upload_backlog(ctx, batches, batch_s=0.05):
    """Long work in batches, checkpointed: a stop (memory pressure, systemctl stop) loses at
    most one batch, and the next run carries on from the last one saved."""
    state = ctx.checkpoint or {"sent": 0}
    while state["sent"] < batches:
        time.sleep(batch_s)                 # stands in for sending one batch
        state = {"sent": state["sent"] + 1}
        ctx.progress(state["sent"], batches)
        ctx.save(state)
    return {"sent": state["sent"]}


@queue.task(priority="low", shed=True, ttl=3600, unique=True, max_attempts=1)
def housekeeping(ctx):
    """Low value: shed under memory pressure, expires if it could not run within an hour,
    and at most one waits at a time however often it is enqueued."""
    removed = 0
    for name in os.listdir(DATA_DIR):
        if name.endswith(".tmp"):
            os.unlink(os.path.join(DATA_DIR, name))
            removed += 1
    return {"removed_tmp_files": removed}
