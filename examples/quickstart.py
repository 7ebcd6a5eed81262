#!/usr/bin/env python3
"""litequeue in about a minute: jobs, a memory budget, shedding and preemption.

    python examples/quickstart.py          (from any directory; -v also shows serve's log)

Against a fresh database in a temporary directory, this runs the real supervisor
(`python litequeue.py serve`) twice and narrates what it sees:

  1. `serve --burst` runs a few built-in demo jobs (echo, sleep) to `done`. Meanwhile we
     measure the memory of the supervisor and its children (their PSS: shared pages counted
     once), because the memory budget of step 2 is sized from it.
  2. `serve --memory-budget ...` runs a long `low` priority `chunked` job that saves a
     checkpoint after every chunk. Then a `high` priority `hog` job grabs memory and pushes
     pressure past 85 % of the budget: the chunked job is asked to stop at its next
     checkpoint and goes back to `queued`; a heartbeat that arrives now (the way cron
     enqueues one) is shed: `skipped`, it is not worth memory we do not have.
  3. The hog ends, pressure falls, and the chunked job resumes from its checkpoint and
     finishes with the right sum.

It prints the story as it happens, then `status` and the events table, and exits 0 only if
all three things happened (the test suite runs it, so it cannot rot).
"""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

# The example sits in examples/ of a checkout: import litequeue.py from the directory above,
# wherever it is run from. (In your app, litequeue.py sits next to your code instead.)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LITEQUEUE = os.path.join(ROOT, "litequeue.py")
sys.path.insert(0, ROOT)
import litequeue  # noqa: E402

MiB = 1 << 20
CHUNKS, CHUNK_S = 20, 0.25      # the chunked job: 20 steps of a quarter second, 5 s in all
HOG_S = 4.0                     # how long the hog holds its memory
# Step 1's tree (supervisor + two jobs) is sized at this share of the budget, and the hog
# so that the tree with the chunked job and the hog reaches PEAK: past the preempt level
# (85 %), short of the emergency level (95 %) where the hog itself would be killed.
BASE_SHARE, PEAK = 0.20, 0.90


class DemoFailed(Exception):
    """Something the demo expected did not happen."""


def cli(*args):
    """`python litequeue.py ARGS`, as you would type it."""
    return subprocess.run([sys.executable, LITEQUEUE, *args], capture_output=True,
                          text=True, timeout=60)


def start_serve(db, log, *flags):
    """The real supervisor, in the background, its log going to `log`."""
    command = [sys.executable, LITEQUEUE, "serve", "--db", db, "--poll", "0.1", *flags]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def tree_pss_bytes(pid):
    """PSS of a process and all its children: what the supervisor weighs against its budget."""
    import psutil
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return 0
    return (litequeue.process_pss_bytes(pid)
            + sum(litequeue.process_pss_bytes(child.pid) for child in children))


class Watcher:
    """Prints each job's state changes as it sees them, so you can watch jobs move."""

    def __init__(self, queue):
        self.queue, self.seen, self.started = queue, {}, litequeue.now()

    def look(self):
        for job in sorted(self.queue.jobs(limit=None), key=lambda job: job.id):
            before = self.seen.get(job.id)
            if before == job.state:
                continue
            self.seen[job.id] = job.state
            detail = ""
            if job.state == "done":
                detail = json.dumps(job.result)
            elif before == "running" or job.state in ("skipped", "dead"):
                detail = self.queue.events(job_id=job.id)[-1]["reason"] or ""
            arrow = f"{before} -> {job.state}" if before else job.state
            print(f"    {litequeue.now() - self.started:5.1f}s  #{job.id:<3} {job.task:<10}"
                  f"{job.priority:<6} {arrow:<20} {detail}".rstrip())

    def wait_for(self, what, predicate, timeout=30.0):
        """Watch until predicate() is truthy; DemoFailed after timeout seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.look()
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        self.look()
        raise DemoFailed(f"timed out after {timeout:g}s waiting for {what}")


def step1_tour(db, queue, watch, log):
    print("1. A supervisor runs a few jobs; we measure its memory meanwhile.")
    print(f"   $ python litequeue.py serve --db {os.path.basename(db)} --burst")
    ids = [queue.enqueue("echo", {"n": n}) for n in range(3)]
    ids += [queue.enqueue("sleep", {"seconds": 1.5}) for _ in range(2)]
    serve = start_serve(db, log, "--burst")
    peak, deadline = 0, time.monotonic() + 60
    while serve.poll() is None:     # --burst: exits once nothing is running or due
        peak = max(peak, tree_pss_bytes(serve.pid))
        watch.look()
        if time.monotonic() > deadline:
            serve.kill()
            raise DemoFailed("serve --burst did not finish within 60 s")
        time.sleep(0.05)
    watch.look()
    if serve.returncode != 0:
        raise DemoFailed(f"serve --burst exited {serve.returncode}")
    not_done = [i for i in ids if queue.get(i).state != "done"]
    if not_done or not peak:
        raise DemoFailed(f"step 1: jobs {not_done} not done (peak PSS {peak})")
    return ids, peak


def step2_pressure(db, queue, watch, log, peak):
    peak_mib = peak / MiB
    budget_mib = math.ceil(peak_mib / BASE_SHARE)
    hog_mib = max(8, int(PEAK * budget_mib - peak_mib))
    print(f"\n2. The supervisor and two jobs peaked at {peak_mib:.0f} MiB, so a budget of "
          f"{budget_mib} MiB puts them at {100 * BASE_SHARE:.0f} %;\n   a {hog_mib} MiB hog "
          f"next to the chunked job will take the tree to about {100 * PEAK:.0f} %\n"
          f"   (the levels: skip from 70 %, preempt from 85 %, emergency from 95 %).")
    flags = ["--memory-budget", f"{budget_mib}M", "--hold", "1", "--grace", "3"]
    print(f"   $ python litequeue.py serve --db {os.path.basename(db)} --poll 0.1 "
          + " ".join(flags))
    serve = start_serve(db, log, *flags)
    try:
        chunked = queue.enqueue("chunked", {"chunks": CHUNKS, "chunk_s": CHUNK_S})
        watch.wait_for("the chunked job to save its first checkpoints",
                       lambda: (queue.get(chunked).progress_done or 0) >= 3)
        print(f"   chunked #{chunked} is saving a checkpoint after each chunk; now a high "
              f"priority job grabs {hog_mib} MiB:")
        hog = queue.enqueue("hog", {"mb": hog_mib, "seconds": HOG_S}, priority="high")

        def preempted():
            job = queue.get(chunked)
            return job if job.state == "queued" and job.preemptions else None

        stopped = watch.wait_for("the chunked job to be preempted", preempted, timeout=20)
        print(f"   chunked #{chunked} stopped at its checkpoint {json.dumps(stopped.checkpoint)}"
              f" and waits. Now cron's heartbeat arrives:")
        print(f"   $ python litequeue.py enqueue heartbeat --db {os.path.basename(db)}")
        enqueued = cli("enqueue", "heartbeat", "--db", db)
        if enqueued.returncode != 0:
            raise DemoFailed(f"enqueue heartbeat: {enqueued.stderr.strip()}")
        heartbeat = int(enqueued.stdout)
        watch.wait_for("the heartbeat to be shed",
                       lambda: queue.get(heartbeat).state != "queued", timeout=10)
        print(f"   the hog finishes after {HOG_S:g} s; pressure falls and, after --hold 1 s, "
              f"the chunked job resumes:")
        watch.wait_for("the chunked job to finish",
                       lambda: queue.get(chunked).state not in ("queued", "running"))
        watch.wait_for("the hog to finish", lambda: queue.get(hog).state != "running")
        print("\n   $ python litequeue.py status")
        print("   " + cli("status", "--db", db).stdout.rstrip().replace("\n", "\n   "))
    finally:
        serve.send_signal(signal.SIGTERM)       # what systemctl stop does: exit 0, lose nothing
        try:
            code = serve.wait(timeout=15)
        except subprocess.TimeoutExpired:
            serve.kill()
            code = serve.wait()
    if code != 0:
        raise DemoFailed(f"serve exited {code} after SIGTERM")
    return chunked, hog, heartbeat, stopped


def print_events(queue, started):
    """Every state change and supervisor decision, as the events table holds them."""
    print("\n   events (the `events` table: every state change and every decision)")
    for event in queue.events(limit=10_000):
        at = event["at"] - started
        job = f"#{event['job_id']}" if event["job_id"] is not None else "-"
        reason = event["reason"] or ""
        if event["kind"] == "job" and event["to_state"] in ("running", "queued") and \
                event["from_state"] in (None, "queued"):
            reason = ""                  # the claiming supervisor's id
        pressure = "" if event["pressure"] is None else f"  [{event['pressure']:.1f} %]"
        print(f"   {at:5.1f}s {event['kind']:<8} {job:<4} {event['task'] or '-':<10}"
              f"{event['from_state'] or 'new'} -> {event['to_state']}  {reason}{pressure}"
              .rstrip())


def check(queue, tour, chunked, hog, heartbeat, stopped):
    """The three things the demo promised, each as (ok, line)."""
    jobs = {i: queue.get(i) for i in [*tour, chunked, hog, heartbeat]}
    result = jobs[chunked].result or {}
    expected = sum(range(CHUNKS))
    ran = [i for i in tour + [hog] if jobs[i].state == "done"]
    return [
        (len(ran) == len(tour) + 1,
         f"jobs ran and finished: {len(ran)} of {len(tour) + 1} done "
         f"(the echo and sleep jobs, and the hog)"),
        (jobs[heartbeat].state == "skipped" and "shed" in (jobs[heartbeat].error or ""),
         f"heartbeat #{heartbeat} shed under memory pressure: {jobs[heartbeat].state} "
         f"({jobs[heartbeat].error})"),
        (jobs[chunked].state == "done" and result.get("sum") == expected
         and jobs[chunked].preemptions >= 1 and jobs[chunked].attempts == 1,
         f"chunked #{chunked} preempted at chunk {stopped.checkpoint['i']}/{CHUNKS}, resumed "
         f"from that checkpoint to sum {result.get('sum')} (expected {expected});\n"
         f"        attempts {jobs[chunked].attempts}: a preemption after a checkpoint costs "
         f"no attempt"),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show serve's own log")
    args = parser.parse_args()
    machine = litequeue.MemoryProbe().machine_percent()
    if machine >= 60:
        print(f"note: this machine is already at {machine:.0f} % memory; the demo needs it "
              f"mostly idle, since the supervisor reacts to machine pressure too.")
    with tempfile.TemporaryDirectory(prefix="litequeue-quickstart-") as tmp:
        db = os.path.join(tmp, "quickstart.db")
        log_path = os.path.join(tmp, "serve.log")
        print(f"litequeue {litequeue.__version__} quickstart, database {db}\n")
        with open(log_path, "w") as log, litequeue.Queue(db) as queue:
            watch = Watcher(queue)
            try:
                tour, peak = step1_tour(db, queue, watch, log)
                chunked, hog, heartbeat, stopped = step2_pressure(db, queue, watch, log, peak)
                failure = None
            except DemoFailed as exc:
                failure = str(exc)
            log.flush()
            if failure is None:
                print_events(queue, watch.started)
                results = check(queue, tour, chunked, hog, heartbeat, stopped)
            else:
                results = [(False, failure)]
        with open(log_path) as f:
            serve_log = f.read()
        ok = all(passed for passed, _ in results)
        if args.verbose or not ok:
            print("\n   serve's log:\n   " + serve_log.rstrip().replace("\n", "\n   "))
        print(f"\n3. What happened ({sum(p for p, _ in results) if ok else 'not all'} of 3):")
        for passed, line in results:
            print(f"   [{'ok' if passed else 'FAILED'}] {line}")
    print("\nquickstart: " + ("all three happened." if ok else "something did not happen "
                              "(see above)."))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
