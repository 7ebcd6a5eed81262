#!/usr/bin/env python3
"""Long tasks that checkpoint: they survive preemption, shutdown and crashes.

Two ways to write one, both below:

  count_primes  a loop that calls ctx.save(state) after each chunk of work
  checksum      a generator that `yield`s its state after each chunk (litequeue saves it)

A checkpoint is stored durably in the database, and it is also the safe point where the
supervisor may stop the job (memory pressure, shutdown, cancel): the job goes back to
`queued` and its next run starts from ctx.checkpoint instead of from scratch. Both report
ctx.progress(done, total), which `litequeue.py status` shows.

    python examples/chunked_task.py

enqueues one job of each, serves them with `litequeue.py serve --app examples/chunked_task.py`,
stops that supervisor with SIGTERM halfway (as `systemctl stop` would), shows the saved
checkpoints, then serves again, in-process with Supervisor(..., burst=True), and checks that
both jobs finished from where they stopped, with the right answers.

As an app, this file is served like any other:

    python litequeue.py serve --app examples/chunked_task.py --db queue.db
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LITEQUEUE = os.path.join(ROOT, "litequeue.py")
sys.path.insert(0, ROOT)       # in your app, litequeue.py sits next to this file instead
from litequeue import Queue, Supervisor  # noqa: E402

# Run as a script, the demo works on a fresh database in a temporary directory. Loaded by
# `serve --app`, it uses $LITEQUEUE_DB, else ./litequeue.db: the same default as --db.
demo_dir = None
if __name__ == "__main__" and not os.environ.get("LITEQUEUE_DB"):
    demo_dir = tempfile.mkdtemp(prefix="litequeue-chunked-")
    os.environ["LITEQUEUE_DB"] = os.path.join(demo_dir, "queue.db")
queue = Queue(os.environ.get("LITEQUEUE_DB") or "litequeue.db")


def is_prime(n):
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n ** 0.5) + 1))


@queue.task(max_attempts=3)
def count_primes(ctx, below=100_000, chunk=5_000):
    """Count primes below `below`, a chunk at a time, saving after each chunk."""
    state = ctx.checkpoint or {"next": 2, "count": 0}      # None on the first run
    resumed_at = state["next"]
    while state["next"] < below:
        n, count = state["next"], state["count"]
        end = min(below, n + chunk)
        time.sleep(0.1)                  # stands in for slower real work (I/O, a model ...)
        while n < end and not ctx.stopping:    # a stop was asked: save what we have, sooner
            count += is_prime(n)
            n += 1
        state = {"next": n, "count": count}
        ctx.progress(n, below)           # shown by `status`
        ctx.save(state)                  # durable; if a stop was asked, the job ends here
    return {"primes": state["count"], "below": below, "resumed_at": resumed_at}


def block(index, size_kb):
    """Deterministic test data: block `index` of a large 'file'."""
    return (f"block {index:06d} ".encode() * (size_kb * 1024 // 13 + 1))[:size_kb * 1024]


@queue.task(priority="low")
def checksum(ctx, blocks=20, block_kb=64):
    """CRC-32 of a large 'file', a block at a time. A generator task: each `yield state`
    is a checkpoint, saved by litequeue, and a safe point to stop."""
    state = ctx.checkpoint or {"block": 0, "crc": 0}
    resumed_at = state["block"]
    while state["block"] < blocks:
        time.sleep(0.1)                  # stands in for slower real work
        crc = zlib.crc32(block(state["block"], block_kb), state["crc"])
        state = {"block": state["block"] + 1, "crc": crc}
        ctx.progress(state["block"], blocks)
        yield state
    return {"crc32": state["crc"], "blocks": blocks, "resumed_at": resumed_at}


# --------------------------------------------------------------------------------------
# The demo: serve, stop halfway, serve again.
# --------------------------------------------------------------------------------------

def cli(*args):
    return subprocess.run([sys.executable, LITEQUEUE, *args, "--db", queue.path],
                          capture_output=True, text=True, timeout=60)


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("chunked_task: timed out")
        time.sleep(0.05)


def demo():
    below, blocks = 100_000, 20
    primes_id = count_primes.enqueue(below=below)
    crc_id = checksum.enqueue(blocks=blocks)
    print(f"enqueued count_primes #{primes_id} and checksum #{crc_id} in {queue.path}")

    print("$ python litequeue.py serve --app examples/chunked_task.py --db ...")
    serve = subprocess.Popen([sys.executable, LITEQUEUE, "serve", "--app",
                              os.path.abspath(__file__), "--db", queue.path, "--poll", "0.1",
                              "--log-level", "warning"])
    try:
        wait_for(lambda: all((queue.get(i).checkpoint or {}).get(key, 0) >= halfway
                             for i, key, halfway in ((primes_id, "next", below // 3),
                                                     (crc_id, "block", blocks // 3))))
        print("$ python litequeue.py status     (both running, with their progress)")
        print(cli("status").stdout.rstrip())
    finally:
        serve.send_signal(signal.SIGTERM)        # stop at the next checkpoint, requeue
        code = serve.wait(timeout=30)
    print(f"SIGTERM: serve exited {code}; the jobs wait with their checkpoints (a stop after "
          f"a checkpoint costs no attempt):")
    for job in (queue.get(primes_id), queue.get(crc_id)):
        print(f"  #{job.id} {job.task:<13} {job.state:<7} checkpoint {job.checkpoint}  "
              f"attempts {job.attempts}")

    print("Serving again, in-process: Supervisor(queue, burst=True).run()")
    Supervisor(queue, poll=0.1, burst=True).run()

    primes, crc = queue.get(primes_id), queue.get(crc_id)
    expected_primes = sum(map(is_prime, range(below)))
    expected_crc = zlib.crc32(b"".join(block(i, 64) for i in range(blocks)))
    for job in (primes, crc):
        print(f"  #{job.id} {job.task:<13} {job.state:<7} {job.result}")
    ok = (primes.state == crc.state == "done" and primes.result["primes"] == expected_primes
          and crc.result["crc32"] == expected_crc
          and primes.result["resumed_at"] > 2 and crc.result["resumed_at"] > 0)
    print(f"both resumed from their checkpoints, answers checked ({expected_primes} primes, "
          f"crc32 {expected_crc}): {'ok' if ok else 'FAILED'}")
    return code == 0 and ok


if __name__ == "__main__":
    try:
        passed = demo()
    finally:
        queue.close()
        if demo_dir is not None:
            shutil.rmtree(demo_dir, ignore_errors=True)
    sys.exit(0 if passed else 1)
