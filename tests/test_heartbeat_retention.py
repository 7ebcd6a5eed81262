"""Heartbeats driven from cron, and retention: purge, `serve --keep`, and a file that stays
small through a long run with another connection open."""

import concurrent.futures
import datetime
import json
import os
import time

import apsw
import pytest
from freezegun import freeze_time

import litequeue
from conftest import integrity_ok, run_cli

T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
MB = 1_000_000


def utc(at):
    return datetime.datetime.fromtimestamp(at, tz=datetime.timezone.utc)


def run_job(q, task, outcome="done", owner="worker", **enqueue_args):
    """Enqueue one job and take it to a final state through the worker API."""
    job_id = q.enqueue(task, **enqueue_args)
    [job] = q.claim(owner, tasks=[task])
    assert job.id == job_id
    if outcome == "done":
        q.complete(job.id, owner, job.attempts, {"ok": True})
    else:
        q.fail(job.id, owner, job.attempts, "RuntimeError: boom", retryable=False)
    return job_id


def status_json(db_path):
    result = run_cli("status", "--json", db=db_path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# -- heartbeats from cron ------------------------------------------------------------------

def test_100_rapid_cron_enqueues_leave_exactly_one_waiting_heartbeat(db_path):
    """No supervisor, no file yet: 100 `enqueue heartbeat` runs, four at a time."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: run_cli("enqueue", "heartbeat", db=db_path),
                                range(100)))
    assert [r.returncode for r in results] == [0] * 100, [r.stderr for r in results if r.returncode]
    assert [r.stderr for r in results if r.stderr] == []       # a known task: no warning
    ids = {r.stdout.strip() for r in results}
    assert len(ids) == 1
    q = litequeue.Queue(db_path)
    try:
        jobs = q.jobs(limit=None)
        assert [(job.id, job.task, job.state) for job in jobs] == [
            (int(ids.pop()), "heartbeat", "queued")]
    finally:
        q.close()
    assert integrity_ok(db_path)
    assert oct(os.stat(db_path).st_mode & 0o777) == oct(0o600)


def test_heartbeat_is_low_priority_and_shed_under_pressure(queue):
    job_id = queue.enqueue("heartbeat")
    job = queue.get(job_id)
    assert (job.priority, job.shed, job.unique_key, job.max_attempts) == (
        "low", True, "heartbeat", 1)
    assert queue.enqueue("heartbeat") == job_id
    steady = queue.enqueue("echo", priority="low")              # low but not shed: it waits

    assert queue.shed_due(at=job.due_at) == [job_id]
    shed = queue.get(job_id)
    assert (shed.state, shed.error) == ("skipped", "shed under memory pressure")
    assert queue.get(steady).state == "queued"
    assert queue.enqueue("heartbeat") not in (job_id, None)     # the next cron run is new


def test_heartbeat_expires_after_its_ttl(queue):
    with freeze_time(T0) as clock:
        job_id = queue.enqueue("heartbeat")
        job = queue.get(job_id)
        assert job.expires_at == pytest.approx(job.due_at + 300)
        assert queue.expire(at=job.due_at + 299) == []
        assert queue.get(job_id).state == "queued"
        assert queue.expire(at=job.due_at + 300) == [job_id]
        expired = queue.get(job_id)
        assert (expired.state, expired.error) == ("skipped", "expired")
        assert expired.finished_at == pytest.approx(job.due_at + 300)

        # A stale one that nobody expired does not hold the key for the next cron run.
        clock.tick(400)
        stale = queue.enqueue("heartbeat")
        clock.tick(301)
        fresh = queue.enqueue("heartbeat")
        assert fresh != stale
        assert queue.get(stale).state == "skipped"
        assert queue.get(fresh).state == "queued"
        assert queue.claim("worker", at=litequeue.now() + 300) == []   # past its ttl: not run


def test_an_app_task_declared_like_a_heartbeat_behaves_like_one_from_cron(db_path, queue):
    @queue.task(priority="low", shed=True, ttl=60, unique=True, max_attempts=1)
    def ping(ctx):
        return "pong"

    first = run_cli("enqueue", "ping", db=db_path)
    second = run_cli("enqueue", "ping", db=db_path)
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    assert first.stderr == second.stderr == ""
    assert first.stdout == second.stdout
    job = queue.get(first.stdout.strip())
    assert (job.priority, job.shed, job.unique_key) == ("low", True, "ping")
    assert job.expires_at == pytest.approx(job.due_at + 60)
    assert queue.shed_due(at=job.due_at) == [job.id]


def test_status_heartbeat_age_is_null_until_a_heartbeat_ran(db_path, queue):
    before = status_json(db_path)
    assert before["heartbeat_age"] is None
    job_id = run_cli("enqueue", "heartbeat", db=db_path).stdout.strip()
    assert status_json(db_path)["heartbeat_age"] is None       # waiting is not done

    served = run_cli("serve", "--burst", "--poll", "0.05", db=db_path, timeout=60)
    assert served.returncode == 0, served.stderr
    assert queue.get(job_id).state == "done"
    after = status_json(db_path)
    assert isinstance(after["heartbeat_age"], (int, float))
    assert 0 <= after["heartbeat_age"] < 30
    text = run_cli("status", db=db_path)
    assert "heartbeat   never" not in text.stdout and " ago" in text.stdout


# -- purge ---------------------------------------------------------------------------------

def test_purge_deletes_only_final_jobs_finished_before_the_cutoff(queue):
    with freeze_time(T0) as clock:
        old_done = run_job(queue, "echo")
        old_dead = run_job(queue, "echo", outcome="fail")
        old_cancelled = queue.enqueue("echo")
        queue.cancel(old_cancelled)
        old_skipped = queue.enqueue("echo", ttl=1)
        queue.expire(at=litequeue.now() + 1)
        old_queued = queue.enqueue("echo", delay=10_000)       # old, but still waiting
        old_running = queue.enqueue("sleep")
        assert [job.id for job in queue.claim("worker", tasks=["sleep"])] == [old_running]
        queue.record_event("decision", "running", "preempt", "kept: its job stays",
                           job_id=old_running, task="sleep")

        clock.tick(3600)
        recent_done = run_job(queue, "echo")
        recent_dead = run_job(queue, "echo", outcome="fail")
        clock.tick(600)

        old = [old_done, old_dead, old_cancelled, old_skipped]
        kept = [old_queued, old_running, recent_done, recent_dead]
        kept_events = {job_id: queue.events(job_id=job_id) for job_id in kept}
        assert all(queue.events(job_id=job_id) for job_id in old)

        assert queue.purge("30m") == 4
        for job_id in old:
            with pytest.raises(litequeue.JobNotFound):
                queue.get(job_id)
            assert queue.events(job_id=job_id) == []
        assert {job_id: queue.get(job_id).state for job_id in kept} == {
            old_queued: "queued", old_running: "running", recent_done: "done",
            recent_dead: "dead"}
        assert {job_id: queue.events(job_id=job_id) for job_id in kept} == kept_events
        assert queue.purge("30m") == 0
        assert queue.purge("0s") == 2                            # the recent final ones
    assert integrity_ok(queue.path)


def test_purge_also_drops_old_events_of_no_job(queue):
    """Level changes and breaker transitions (events with no job) age out with the jobs, in
    the same purge; otherwise a busy queue that always has jobs to purge keeps them forever."""
    with freeze_time(T0) as clock:
        queue.record_event("level", "normal", "skip", "memory pressure", pressure=72.0)
        run_job(queue, "echo")
        clock.tick(3600)
        queue.record_event("level", "skip", "normal", "memory pressure", pressure=40.0)
        assert queue.purge("10m") == 1
        assert [(e["kind"], e["to_state"]) for e in queue.events()] == [("level", "normal")]


def test_cli_purge_older_than(db_path, queue):
    with freeze_time(utc(time.time() - 7200)):
        old = run_job(queue, "echo")
    recent = run_job(queue, "echo")
    result = run_cli("purge", "--older-than", "1h", db=db_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "purged 1 jobs"
    assert [job.id for job in queue.jobs(limit=None)] == [recent]
    with pytest.raises(litequeue.JobNotFound):
        queue.get(old)


def test_serve_keep_purges_old_finished_jobs(db_path, queue):
    with freeze_time(utc(time.time() - 3600)):
        old = [run_job(queue, "echo") for _ in range(5)]
        old.append(run_job(queue, "fail", outcome="fail"))
        waiting_since_long = queue.enqueue("echo", delay=10_000)
    fresh = [queue.enqueue("echo", {"n": n}) for n in range(3)]

    # --keep 5s, not 1s: the fresh jobs must not age past it while this run lasts.
    served = run_cli("serve", "--keep", "5s", "--burst", "--poll", "0.05", db=db_path,
                     timeout=60)
    assert served.returncode == 0, served.stderr
    assert "retention: purged 6 finished jobs" in served.stderr
    remaining = {job.id: job.state for job in queue.jobs(limit=None)}
    assert remaining == {waiting_since_long: "queued", **{job_id: "done" for job_id in fresh}}
    for job_id in old:
        assert queue.events(job_id=job_id) == []
    assert integrity_ok(db_path)


# -- WAL and file size ---------------------------------------------------------------------

def test_checkpoint_does_not_stall_while_a_reader_is_in_a_transaction(db_path):
    """A reader mid-read (a `status` run, a backup) must not block the supervisor's retention
    round for the busy timeout: the supervisor loop polls memory and reaps children."""
    q = litequeue.Queue(db_path, durable=False, busy_timeout=3)
    reader = apsw.Connection(db_path)
    try:
        q.enqueue_many(["echo"] * 500)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM jobs").fetchall()    # holds a snapshot
        q.enqueue_many(["echo"] * 500)
        started = time.monotonic()
        q.checkpoint_wal()
        assert time.monotonic() - started < 1.0
        reader.execute("COMMIT")
        q.checkpoint_wal()
        assert os.path.getsize(db_path + "-wal") == 0              # the next round truncates
    finally:
        reader.close()
        q.close()


def test_soak_20000_jobs_keep_the_file_and_wal_small_with_a_reader_open(db_path):
    """20 batches of 1,000 no-op jobs: enqueue, claim, complete, purge, checkpoint.
    synchronous=NORMAL: this is about sizes, not fsync cost."""
    q = litequeue.Queue(db_path, durable=False)
    reader = apsw.Connection(db_path)        # another process's connection, between reads
    sizes = []
    try:
        for batch in range(20):
            q.enqueue_many([("echo", {"batch": batch, "i": i}) for i in range(1000)])
            done = 0
            while True:
                jobs = q.claim("soak", limit=250)
                if not jobs:
                    break
                for job in jobs:
                    q.complete(job.id, "soak", job.attempts, job.payload)
                done += len(jobs)
            assert done == 1000
            wal_peak = os.path.getsize(db_path + "-wal")
            assert reader.execute("SELECT count(*) FROM jobs WHERE state = 'done'"
                                  ).fetchall()[0][0] == 1000
            assert q.purge("0s") == 1000
            q.checkpoint_wal()
            sizes.append((os.path.getsize(db_path), os.path.getsize(db_path + "-wal"), wal_peak))
        stats = q.stats()["jobs"]
        assert sum(stats.values()) == 0
        assert q.events(limit=10) == []
    finally:
        reader.close()
        q.close()
    db_sizes, wal_sizes, wal_peaks = zip(*sizes)
    assert max(db_sizes) < 10 * MB, sizes
    assert max(wal_peaks) < 10 * MB, sizes
    assert wal_sizes[-1] == 0, sizes                 # truncated with the reader still open
    assert db_sizes[-1] <= 2 * db_sizes[0], sizes    # not growing batch over batch
    assert integrity_ok(db_path)
