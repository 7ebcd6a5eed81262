"""Many processes on one file, for real: producers enqueue while consumers claim and
complete. Every job is completed exactly once, no worker ever sees an error (in particular
not 'database is locked'), and the file passes PRAGMA integrity_check."""

import collections
import multiprocessing
import subprocess
import sys
import time
import traceback

import apsw
import pytest

import litequeue
from conftest import integrity_ok

PRODUCERS, JOBS_EACH, CONSUMERS = 8, 250, 2
TOTAL = PRODUCERS * JOBS_EACH
DEADLINE_S = 90.0

# fork: the workers are plain functions of this module and start in milliseconds. Nothing of
# the parent's SQLite state is inherited: the parent holds no connection while they run.
mp = multiprocessing.get_context("fork")


def _report(results, role, index, fn):
    """Run fn() and send back ("ok", value) or ("error", traceback): never fail silently."""
    try:
        results.put((role, index, "ok", fn()))
    except BaseException:                       # report everything, then let the process end
        results.put((role, index, "error", traceback.format_exc()))


def _produce(path, index, start, first_done, results):
    def work():
        queue = litequeue.Queue(path)
        try:
            start.wait(30)
            half = JOBS_EACH // 2
            ids = [queue.enqueue("work", {"producer": index, "n": n}) for n in range(half)]
            # The second half only once consumers have completed something: consuming then
            # certainly overlaps producing, however the machine schedules us.
            if not first_done.wait(DEADLINE_S):
                raise TimeoutError("no job completed while producing")
            return ids + [queue.enqueue("work", {"producer": index, "n": n})
                          for n in range(half, JOBS_EACH)]
        finally:
            queue.close()
    _report(results, "producer", index, work)


def _consume(path, index, start, first_done, results):
    def work():
        queue = litequeue.Queue(path)
        owner = f"consumer-{index}"
        completed = []
        deadline = time.monotonic() + DEADLINE_S
        try:
            start.wait(30)
            while True:
                jobs = queue.claim(owner, tasks=["work"])
                if jobs:
                    job = jobs[0]
                    queue.complete(job.id, owner, job.attempts, {"by": owner})
                    completed.append(job.id)
                    first_done.set()
                    continue
                if queue.stats()["jobs"]["done"] >= TOTAL:
                    return completed
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{owner}: not all {TOTAL} jobs done after {DEADLINE_S}s")
                time.sleep(0.002)           # idle: producers have not caught up yet
        finally:
            queue.close()
    _report(results, "consumer", index, work)


def _collect(processes, results, expected):
    messages = []
    for _ in range(expected):
        messages.append(results.get(timeout=DEADLINE_S + 30))
    for process in processes:
        process.join(30)
        assert process.exitcode == 0, (process.name, process.exitcode)
    return messages


def test_producers_and_consumers_complete_every_job_exactly_once(tmp_path):
    path = str(tmp_path / "busy.db")
    litequeue.Queue(path).close()                  # the file exists before anyone races
    results = mp.Queue()
    start, first_done = mp.Barrier(PRODUCERS + CONSUMERS), mp.Event()
    processes = (
        [mp.Process(target=_produce, args=(path, i, start, first_done, results),
                    name=f"producer-{i}") for i in range(PRODUCERS)]
        + [mp.Process(target=_consume, args=(path, i, start, first_done, results),
                      name=f"consumer-{i}") for i in range(CONSUMERS)])
    for process in processes:
        process.start()
    try:
        messages = _collect(processes, results, len(processes))
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(5)

    errors = [f"{role} {index}:\n{value}" for role, index, status, value in messages
              if status != "ok"]
    assert not errors, "\n".join(errors)
    assert not any("database is locked" in str(m[3]) for m in messages)

    produced = [job_id for role, _, _, ids in messages if role == "producer" for job_id in ids]
    consumed = [job_id for role, _, _, ids in messages if role == "consumer" for job_id in ids]
    assert len(produced) == TOTAL and len(set(produced)) == TOTAL
    assert sorted(consumed) == sorted(produced)              # each completed once, by one

    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        states = collections.Counter(state for (state,) in conn.execute(
            "SELECT state FROM jobs"))
        done_events = collections.Counter(job_id for (job_id,) in conn.execute(
            "SELECT job_id FROM events WHERE kind = 'job' AND to_state = 'done'"))
        claims = collections.Counter(job_id for (job_id,) in conn.execute(
            "SELECT job_id FROM events WHERE kind = 'job' AND to_state = 'running'"))
        attempts = {a for (a,) in conn.execute("SELECT DISTINCT attempts FROM jobs")}
        payloads = {(p, n) for p, n in conn.execute(
            "SELECT json_extract(payload, '$.producer'), json_extract(payload, '$.n') FROM jobs")}
        first_done = conn.execute(
            "SELECT min(at) FROM events WHERE kind = 'job' AND to_state = 'done'").fetchall()[0][0]
        last_enqueued = conn.execute("SELECT max(created_at) FROM jobs").fetchall()[0][0]
    finally:
        conn.close()
    assert states == {"done": TOTAL}
    assert set(done_events) == set(produced)
    assert set(done_events.values()) == {1}
    assert set(claims.values()) == {1}                        # nobody claimed a job twice
    assert attempts == {1}
    assert len(payloads) == TOTAL                              # no enqueue lost or doubled
    assert first_done < last_enqueued                          # consuming overlapped producing
    assert integrity_ok(path)


def _open_and_enqueue(path, index, start, results):
    def work():
        start.wait(30)
        with litequeue.Queue(path) as queue:
            return queue.enqueue("echo", {"opener": index})
    _report(results, "opener", index, work)


def test_processes_creating_the_same_new_file_at_once_share_it(tmp_path):
    path = str(tmp_path / "fresh.db")
    count = 8
    results = mp.Queue()
    start = mp.Barrier(count)
    processes = [mp.Process(target=_open_and_enqueue, args=(path, i, start, results))
                 for i in range(count)]
    for process in processes:
        process.start()
    try:
        messages = _collect(processes, results, count)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    errors = [value for _, _, status, value in messages if status != "ok"]
    assert not errors, "\n".join(errors)
    ids = sorted(value for _, _, _, value in messages)
    assert len(set(ids)) == count
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.db"]   # no temp files left
    with litequeue.Queue(path) as queue:
        assert sorted(job.id for job in queue.jobs(limit=None)) == ids
        assert {job.payload["opener"] for job in queue.jobs(limit=None)} == set(range(count))
    assert integrity_ok(path)


def test_a_write_waits_out_a_held_lock_then_gives_up_at_the_busy_timeout(tmp_path):
    """The busy handler: a write behind another process's lock proceeds once it is released,
    and past the busy timeout fails as DatabaseUnusable (exit 4 from the CLI), not before."""
    path = str(tmp_path / "locked.db")
    litequeue.Queue(path).close()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import apsw, sys, time\n"
        f"c = apsw.Connection({path!r}); c.execute('BEGIN IMMEDIATE')\n"
        "print('locked', flush=True); time.sleep(float(sys.stdin.readline()))\n"
        "c.execute('COMMIT')")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        queue = litequeue.Queue(path, busy_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(litequeue.DatabaseUnusable, match="locked|busy"):
            queue.enqueue("echo")
        waited = time.monotonic() - started
        assert 0.5 <= waited < 3.0, waited
        holder.stdin.write("0.3\n")                     # now let go after 0.3 s
        holder.stdin.flush()
        waiting = litequeue.Queue(path, busy_timeout=10)
        job_id = waiting.enqueue("echo")                # waits for the lock, then gets it
        assert waiting.get(job_id).state == "queued"
        assert holder.wait(10) == 0
    finally:
        holder.kill()
        holder.wait()
