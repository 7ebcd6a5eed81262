"""The Queue API on real SQLite files: the file itself, the catalogue, enqueue and its
guards (unique keys, max_depth, bad input), the claim/lease path, checkpoints and events."""

import datetime
import gc
import hashlib
import math
import os

import apsw
import pytest
from freezegun import freeze_time

import litequeue
from conftest import file_digest

T0 = 1_800_000_000.0          # a fixed "now" for tests that control the clock
TABLES = ("meta", "tasks", "jobs", "events", "breakers", "supervisors")


# -- helpers -----------------------------------------------------------------------------

def frozen(at):
    """freeze_time at epoch seconds `at` (litequeue.now() then returns exactly `at`)."""
    return freeze_time(datetime.datetime.fromtimestamp(at, datetime.timezone.utc))


def snapshot(path):
    """Every row of every litequeue table, read through a separate connection."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return {table: sorted(map(repr, conn.execute(f"SELECT * FROM {table}").fetchall()))
                for table in TABLES}
    finally:
        conn.close()


def transitions(queue, job_id):
    """(from, to) of each change of an existing job (a creation event, if any, left out)."""
    return [(e["from_state"], e["to_state"]) for e in queue.events(job_id=job_id, kind="job")
            if e["from_state"] is not None]


def claim_one(queue, owner="w1", at=None, **kwargs):
    jobs = queue.claim(owner, at=at, **kwargs)
    assert len(jobs) == 1, jobs
    return jobs[0]


# -- the file ------------------------------------------------------------------------------

def test_new_file_is_owner_only_wal_and_marked(tmp_path):
    path = str(tmp_path / "new.db")
    old_umask = os.umask(0)         # even a permissive umask must not widen the mode
    try:
        queue = litequeue.Queue(path)
        queue.enqueue("echo")       # the -wal and -shm beside it exist while it is open
    finally:
        os.umask(old_umask)
    try:
        for name in (path, path + "-wal", path + "-shm"):
            assert os.stat(name).st_mode & 0o777 == 0o600, name
        conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchall() == [("wal",)]
            assert conn.execute("PRAGMA application_id").fetchall() == [(litequeue.APPLICATION_ID,)]
            assert conn.execute("PRAGMA user_version").fetchall() == [(litequeue.SCHEMA_VERSION,)]
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_schema WHERE type = 'table'")}
        finally:
            conn.close()
        assert set(TABLES) <= tables
        assert litequeue.SCHEMA_VERSION >= 1 and litequeue.APPLICATION_ID != 0
    finally:
        queue.close()


def test_second_queue_on_same_file_shares_jobs(db_path):
    first = litequeue.Queue(db_path)
    second = litequeue.Queue(db_path)
    try:
        job_id = first.enqueue("echo", {"n": 1})
        assert second.get(job_id).payload == {"n": 1}
        other_id = second.enqueue("echo", {"n": 2})
        assert [job.id for job in first.jobs()] == [other_id, job_id]
    finally:
        first.close()
        second.close()


def test_default_durability_is_full_and_durable_false_is_normal(db_path):
    full = litequeue.Queue(db_path)
    fast = litequeue.Queue(db_path, durable=False)
    try:
        assert full.conn.execute("PRAGMA synchronous").fetchall() == [(2,)]
        assert fast.conn.execute("PRAGMA synchronous").fetchall() == [(1,)]
    finally:
        full.close()
        fast.close()


def test_busy_timeout_is_set(db_path):
    default = litequeue.Queue(db_path)
    short = litequeue.Queue(db_path, busy_timeout=2)
    try:
        assert default.conn.execute("PRAGMA busy_timeout").fetchall() == [(10_000,)]
        assert short.conn.execute("PRAGMA busy_timeout").fetchall() == [(2_000,)]
    finally:
        default.close()
        short.close()


def _make_directory(tmp_path):
    path = tmp_path / "adir"
    path.mkdir()
    return path


def _make_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not a database\n" * 200)
    return path


def _make_foreign_sqlite(tmp_path):
    path = tmp_path / "foreign.db"
    conn = apsw.Connection(str(path))
    conn.execute("CREATE TABLE people (name TEXT); INSERT INTO people VALUES ('ada')")
    conn.close()
    return path


def _make_newer_version(tmp_path):
    path = tmp_path / "newer.db"
    litequeue.Queue(str(path)).close()
    conn = apsw.Connection(str(path))
    conn.execute(f"PRAGMA user_version = {litequeue.SCHEMA_VERSION + 1}")
    conn.close()
    return path


def _make_empty_file(tmp_path):
    path = tmp_path / "empty.db"
    path.write_bytes(b"")
    return path


UNUSABLE = {
    "directory": _make_directory,
    "not-sqlite": _make_text_file,
    "foreign-sqlite": _make_foreign_sqlite,
    "newer-version": _make_newer_version,
    "zero-length": _make_empty_file,
}


@pytest.mark.parametrize("kind", list(UNUSABLE))
def test_unusable_file_is_refused_and_left_untouched(tmp_path, kind):
    path = UNUSABLE[kind](tmp_path)
    listing = sorted(os.listdir(tmp_path))
    before = None if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    mode = os.stat(path).st_mode

    with pytest.raises(litequeue.DatabaseUnusable) as info:
        litequeue.Queue(str(path))

    message = str(info.value)
    del info                               # drop the traceback and whatever it holds
    gc.collect()
    assert str(path) in message
    assert sorted(os.listdir(tmp_path)) == listing          # nothing left beside it
    assert os.stat(path).st_mode == mode
    if before is not None:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_refused_file_is_closed_at_once(tmp_path):
    """The connection to a refused file is closed before the error reaches the caller:
    no open descriptor, no -wal/-shm left beside someone else's file while the caller
    still holds the exception (logs it, retries later, ...)."""
    path = _make_newer_version(tmp_path)
    listing = sorted(os.listdir(tmp_path))
    try:
        litequeue.Queue(str(path))
    except litequeue.DatabaseUnusable as exc:
        held = exc                         # as a caller that logs or stores it would
        assert sorted(os.listdir(tmp_path)) == listing
    assert held.exit_code == 4


def test_missing_directory_is_unusable(tmp_path):
    with pytest.raises(litequeue.DatabaseUnusable):
        litequeue.Queue(str(tmp_path / "no" / "such" / "q.db"))
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("path", [123, 1.5, True, ["q.db"], object(), "", "q\0.db", b"q\0.db"])
def test_a_path_that_is_not_a_path_is_bad_input(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(litequeue.BadInput) as info:
        litequeue.Queue(path)
    assert "database path" in str(info.value) and "\n" not in str(info.value)
    assert os.listdir(tmp_path) == []


def test_a_path_may_be_str_bytes_or_path_like(tmp_path):
    for path in (str(tmp_path / "s.db"), os.fsencode(tmp_path / "b.db"), tmp_path / "p.db"):
        with litequeue.Queue(path) as queue:
            assert queue.path == os.fsdecode(path)
            queue.enqueue("echo")
    assert sorted(os.listdir(tmp_path)) == ["b.db", "p.db", "s.db"]


@pytest.mark.parametrize("argument, value", [
    ("max_depth", -1), ("max_depth", "5"), ("max_depth", 2.5), ("max_depth", True),
    ("durable", "no"), ("durable", None), ("durable", 0),
    ("busy_timeout", None), ("busy_timeout", "soon"), ("busy_timeout", -1),
    ("busy_timeout", 1e10),
    ("breaker", 3), ("breaker", {"failures": 2}),
])
def test_bad_queue_arguments_are_bad_input_and_create_nothing(tmp_path, argument, value):
    path = tmp_path / "q.db"
    with pytest.raises(litequeue.BadInput) as info:
        litequeue.Queue(str(path), **{argument: value})
    assert argument in str(info.value) and "\n" not in str(info.value)
    assert os.listdir(tmp_path) == []


# -- the task catalogue ----------------------------------------------------------------------

def test_task_defaults_are_stored_in_the_catalogue(queue):
    @queue.task(priority="low", max_attempts=5, timeout=60, memory_limit="200M", ttl="5m",
                shed=True, unique=True)
    def tidy(ctx):
        return None

    stored = queue.catalogue()["tidy"]
    assert stored.priority == litequeue.LOW
    assert stored.max_attempts == 5
    assert stored.timeout_s == 60.0
    assert stored.memory_limit_bytes == 200 * 2**20
    assert stored.ttl_s == 300.0
    assert stored.shed is True and stored.unique_task is True
    assert queue.registry["tidy"] is tidy
    assert "heartbeat" in queue.catalogue()


def test_enqueue_by_name_from_another_queue_uses_stored_defaults(db_path):
    producer_side = litequeue.Queue(db_path)

    @producer_side.task(priority="high", max_attempts=7, timeout=30, memory_limit="64M",
                        ttl=120, shed=True)
    def report(ctx, day):
        return day

    producer_side.close()

    with frozen(T0):
        cron_side = litequeue.Queue(db_path)            # no registry: only the file
        assert cron_side.registry == {}
        assert cron_side.is_known_task("report")
        job = cron_side.get(cron_side.enqueue("report", {"day": 3}))
    cron_side.close()
    assert job.priority == "high"
    assert job.max_attempts == 7
    assert job.timeout_s == 30.0
    assert job.memory_limit_bytes == 64 * 2**20
    assert job.expires_at == pytest.approx(T0 + 120)
    assert job.shed is True
    assert job.payload == {"day": 3}


def test_enqueue_arguments_override_task_defaults(queue):
    @queue.task(priority="low", max_attempts=2, ttl=60)
    def scan(ctx):
        return None

    with frozen(T0):
        job = queue.get(queue.enqueue("scan", priority="critical", max_attempts=9, ttl=10,
                                      timeout="2m", memory_limit="1G", delay=5))
    assert job.priority == "critical"
    assert job.max_attempts == 9
    assert job.timeout_s == 120.0
    assert job.memory_limit_bytes == 2**30
    assert job.due_at == pytest.approx(T0 + 5)
    assert job.expires_at == pytest.approx(T0 + 15)         # ttl counts from due


def test_unknown_name_uses_global_defaults(queue):
    assert not queue.is_known_task("nosuchtask")
    job = queue.get(queue.enqueue("nosuchtask"))
    assert job.priority == "normal"
    assert job.max_attempts == litequeue.DEFAULT_MAX_ATTEMPTS
    assert job.timeout_s is None and job.expires_at is None and job.unique_key is None
    assert job.state == "queued" and job.attempts == 0


def test_task_enqueue_uses_keywords_as_payload(queue):
    @queue.task
    def summarize(ctx, doc_id):
        return doc_id

    job = queue.get(summarize.enqueue(doc_id=7))
    assert job.task == "summarize" and job.payload == {"doc_id": 7}
    assert summarize(None, doc_id=4) == 4


# -- inspect and steer -------------------------------------------------------------------------

def test_get_returns_a_job_snapshot(queue):
    with frozen(T0):
        job_id = queue.enqueue("echo", {"a": [1, 2]}, priority="high")
    job = queue.get(job_id)
    assert (job.id, job.task, job.payload, job.priority, job.state) == (
        job_id, "echo", {"a": [1, 2]}, "high", "queued")
    assert job.attempts == 0 and job.result is None and job.error is None
    assert job.checkpoint is None
    assert job.created_at == pytest.approx(T0) and job.due_at == pytest.approx(T0)
    assert queue.get(str(job_id)).id == job_id
    with pytest.raises(litequeue.JobNotFound):
        queue.get(job_id + 1000)


def test_jobs_filters_newest_first_with_limit(queue):
    a = queue.enqueue("echo")
    b = queue.enqueue("sleep")
    c = queue.enqueue("echo")
    queue.cancel(c)
    assert [j.id for j in queue.jobs()] == [c, b, a]
    assert [j.id for j in queue.jobs(task="echo")] == [c, a]
    assert [j.id for j in queue.jobs(state="queued")] == [b, a]
    assert [j.id for j in queue.jobs(state="cancelled", task="echo")] == [c]
    assert [j.id for j in queue.jobs(limit=2)] == [c, b]
    assert len(queue.jobs(limit=None)) == 3
    with pytest.raises(litequeue.BadInput):
        queue.jobs(state="finished")


def test_stats_counts_by_state_and_priority(queue):
    queue.enqueue("echo", priority="low")
    queue.enqueue("echo", priority="low")
    queue.cancel(queue.enqueue("echo", priority="critical"))
    claim_one(queue, priorities=(3,))
    stats = queue.stats()
    assert stats["jobs"] == {"queued": 1, "running": 1, "done": 0, "dead": 0,
                             "cancelled": 1, "skipped": 0}
    assert stats["priorities"]["low"] == {"queued": 1, "running": 1}
    assert stats["priorities"]["critical"] == {"cancelled": 1}
    assert stats["priorities"]["normal"] == {}


def test_cancel_queued_job_is_final(queue):
    job_id = queue.enqueue("echo")
    assert queue.cancel(job_id) == "cancelled"
    job = queue.get(job_id)
    assert job.state == "cancelled" and job.finished_at is not None
    assert queue.claim("w1") == []
    with pytest.raises(litequeue.InvalidState):
        queue.cancel(job_id)


def test_cancel_running_job_asks_its_owner(queue):
    job_id = queue.enqueue("echo")
    job = claim_one(queue)
    assert queue.cancel(job_id) == "running"
    assert queue.get(job_id).cancel_requested is True
    queue.finish_cancelled(job_id, "w1", job.attempts)
    assert queue.get(job_id).state == "cancelled"


def test_cancel_unknown_job(queue):
    with pytest.raises(litequeue.JobNotFound):
        queue.cancel(12345)


def test_retry_puts_final_job_back_with_fresh_attempts(queue):
    job_id = queue.enqueue("echo", max_attempts=1)
    job = claim_one(queue)
    assert queue.fail(job_id, "w1", job.attempts, "boom") == "dead"
    assert queue.retry(job_id) == job_id
    job = queue.get(job_id)
    assert job.state == "queued" and job.attempts == 0 and job.finished_at is None
    assert claim_one(queue).id == job_id
    with pytest.raises(litequeue.InvalidState):
        queue.retry(job_id)                     # running: nothing to retry


def test_retry_refused_while_another_job_holds_the_unique_key(queue):
    first = queue.enqueue("echo", unique="nightly")
    queue.cancel(first)
    second = queue.enqueue("echo", unique="nightly")
    assert second != first
    before = snapshot(queue.path)
    with pytest.raises(litequeue.InvalidState):
        queue.retry(first)
    assert snapshot(queue.path) == before
    assert queue.get(first).state == "cancelled"


def test_purge_deletes_old_final_jobs_and_their_events(queue):
    with frozen(T0):
        old_done = queue.enqueue("echo")
        old_cancelled = queue.enqueue("echo")
        still_queued = queue.enqueue("echo")
        job = claim_one(queue, at=T0, tasks=["echo"])
        assert job.id == old_done
        queue.complete(old_done, "w1", job.attempts, {"ok": True})
        queue.cancel(old_cancelled)
    with frozen(T0 + 3 * 86400):
        recent = queue.enqueue("echo")
        queue.cancel(recent)
    assert queue.events(job_id=old_done)

    assert queue.purge("2d", at=T0 + 3 * 86400) == 2
    remaining = {j.id for j in queue.jobs(limit=None)}
    assert remaining == {still_queued, recent}
    assert queue.events(job_id=old_done) == [] and queue.events(job_id=old_cancelled) == []
    assert queue.events(job_id=recent)
    assert queue.purge("2d", at=T0 + 3 * 86400) == 0
    with pytest.raises(litequeue.BadInput):
        queue.purge("soon")


# -- priorities, due time, ttl -------------------------------------------------------------------

def test_claim_order_is_priority_then_due_time_then_id(queue):
    with frozen(T0) as clock:
        low = queue.enqueue("echo", priority="low")
        late = queue.enqueue("echo", delay=10)                # normal, due T0+10
        first_normal = queue.enqueue("echo")                  # normal, due T0
        second_normal = queue.enqueue("echo")                 # normal, due T0, larger id
        clock.move_to(datetime.datetime.fromtimestamp(T0 + 5, datetime.timezone.utc))
        created_later_due_sooner = queue.enqueue("echo")      # normal, due T0+5
        critical = queue.enqueue("echo", priority="critical")
        high = queue.enqueue("echo", priority="high")
    order = [claim_one(queue, at=T0 + 20).id for _ in range(7)]
    assert order == [critical, high, first_normal, second_normal, created_later_due_sooner,
                     late, low]
    assert queue.claim("w1", at=T0 + 20) == []


def test_claim_limit_and_priorities_and_tasks(queue):
    with frozen(T0):
        low = queue.enqueue("echo", priority="low")
        normal = queue.enqueue("sleep")
        high = queue.enqueue("echo", priority="high")
    assert [j.id for j in queue.claim("w1", at=T0, tasks=["sleep"])] == [normal]
    assert [j.id for j in queue.claim("w1", at=T0, priorities=(3,))] == [low]
    assert queue.claim("w1", at=T0, tasks=["nothing-here"]) == []
    assert [j.id for j in queue.claim("w1", at=T0, limit=5)] == [high]


def _bulk_queue(path, count, first_due):
    """`count` queued normal jobs, inserted in one statement (the setup, not the subject)."""
    conn = apsw.Connection(str(path))
    conn.set_busy_timeout(5000)
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
        " INSERT INTO jobs (task, priority, state, max_attempts, created_at, due_at)"
        " SELECT 'echo', 2, 'queued', 3, ?, ? + i FROM n", (count, first_due, first_due))
    conn.close()


def _claim_steps(queue, at):
    """SQLite VM steps (in tens) spent by one claim."""
    steps = []
    queue.conn.set_progress_handler(lambda: steps.append(1) or False, 10)
    try:
        claim_one(queue, at=at)
    finally:
        queue.conn.set_progress_handler(None)
    return len(steps)


def test_claim_cost_does_not_grow_with_the_queue(queue):
    _bulk_queue(queue.path, 500, T0)
    small = _claim_steps(queue, at=T0 + 10**6)
    _bulk_queue(queue.path, 20_000, T0 + 1000)
    large = _claim_steps(queue, at=T0 + 10**6)
    assert large <= 2 * small + 5, (small, large)         # an index seek, not a scan


def test_delayed_job_is_not_claimable_before_due(queue):
    with frozen(T0):
        job_id = queue.enqueue("echo", delay="30s")
    assert queue.get(job_id).due_at == pytest.approx(T0 + 30)
    assert queue.claim("w1", at=T0 + 29.9) == []
    assert not queue.has_due(at=T0 + 29.9)
    assert queue.has_due(at=T0 + 30)
    assert claim_one(queue, at=T0 + 30).id == job_id


def test_ttl_expired_job_becomes_skipped(queue):
    with frozen(T0):
        job_id = queue.enqueue("echo", delay=60, ttl=30)      # due T0+60, expires T0+90
        other = queue.enqueue("echo")
    assert queue.expire(at=T0 + 89) == []                     # ttl counts from due, not creation
    assert queue.get(job_id).state == "queued"
    assert [j.id for j in queue.claim("w1", at=T0 + 95, limit=5)] == [other]   # never claimed
    assert queue.expire(at=T0 + 95) == [job_id]
    job = queue.get(job_id)
    assert job.state == "skipped" and job.attempts == 0
    assert "expired" in job.error
    assert transitions(queue, job_id)[-1] == ("queued", "skipped")
    assert queue.expire(at=T0 + 200) == []


def test_expired_unique_holder_does_not_block_a_new_enqueue(queue):
    with frozen(T0):
        stale = queue.enqueue("echo", unique="hb", ttl=10)
    with frozen(T0 + 5):
        assert queue.enqueue("echo", unique="hb", ttl=10) == stale
    with frozen(T0 + 11):
        fresh = queue.enqueue("echo", unique="hb", ttl=10)
    assert fresh != stale
    assert queue.get(stale).state == "skipped"
    assert queue.get(fresh).state == "queued"


# -- unique keys ----------------------------------------------------------------------------

def test_unique_key_returns_existing_id_and_writes_nothing(queue):
    job_id = queue.enqueue("echo", {"v": 1}, unique="daily-report")
    before, digest = snapshot(queue.path), file_digest(queue.path)
    again = queue.enqueue("echo", {"v": 2}, unique="daily-report", priority="critical")
    assert again == job_id
    assert snapshot(queue.path) == before
    assert file_digest(queue.path) == digest
    assert queue.get(job_id).payload == {"v": 1}


def test_unique_key_blocks_while_running_and_frees_when_final(queue):
    job_id = queue.enqueue("echo", unique="k")
    job = claim_one(queue)
    assert queue.enqueue("echo", unique="k") == job_id           # running still holds it
    queue.complete(job_id, "w1", job.attempts)
    new_id = queue.enqueue("echo", unique="k")
    assert new_id != job_id
    assert queue.enqueue("echo", unique="other") not in (job_id, new_id)


def test_task_unique_true_makes_its_name_the_key(queue):
    @queue.task(unique=True, priority="low")
    def ping(ctx):
        return None

    first = ping.enqueue()
    assert ping.enqueue() == first
    assert queue.enqueue("ping") == first
    assert queue.get(first).unique_key == "ping"
    assert len(queue.jobs(task="ping")) == 1
    # the built-in heartbeat is declared the same way
    hb = queue.enqueue("heartbeat")
    assert queue.enqueue("heartbeat") == hb
    assert queue.get(hb).priority == "low" and queue.get(hb).shed is True


# -- max_depth -------------------------------------------------------------------------------

def test_max_depth_raises_queue_full_and_writes_nothing(db_path):
    queue = litequeue.Queue(db_path, max_depth=2)
    try:
        queue.enqueue("echo")
        queue.enqueue("echo")
        before, digest = snapshot(db_path), file_digest(db_path)
        with pytest.raises(litequeue.QueueFull):
            queue.enqueue("echo")
        assert snapshot(db_path) == before
        assert file_digest(db_path) == digest
        assert queue.stats()["jobs"]["queued"] == 2
    finally:
        queue.close()


def test_max_depth_is_a_property_of_the_file(db_path):
    litequeue.Queue(db_path, max_depth=1).close()
    other = litequeue.Queue(db_path)                   # no max_depth: obeys the stored one
    try:
        assert other.max_depth == 1
        other.enqueue("echo")
        with pytest.raises(litequeue.QueueFull):
            other.enqueue("echo")
    finally:
        other.close()
    unbounded = litequeue.Queue(db_path, max_depth=0)
    try:
        assert unbounded.max_depth == 0
        for _ in range(5):
            unbounded.enqueue("echo")
        assert unbounded.stats()["jobs"]["queued"] == 6
    finally:
        unbounded.close()


def test_new_file_is_unbounded_and_bad_max_depth_is_refused(db_path):
    queue = litequeue.Queue(db_path)
    try:
        assert queue.max_depth == 0
        queue.enqueue_many(["echo"] * 50)
        assert queue.stats()["jobs"]["queued"] == 50
        for bad in (-1, 1.5, "3", True):
            with pytest.raises(litequeue.BadInput):
                queue.set_max_depth(bad)
        assert queue.max_depth == 0
    finally:
        queue.close()


def test_duplicate_unique_enqueue_on_full_queue_returns_id(db_path):
    queue = litequeue.Queue(db_path, max_depth=1)
    try:
        job_id = queue.enqueue("heartbeat")
        assert queue.enqueue("heartbeat") == job_id
        assert queue.enqueue("echo", unique="heartbeat") == job_id
        with pytest.raises(litequeue.QueueFull):
            queue.enqueue("echo")
    finally:
        queue.close()


def test_max_depth_counts_queued_jobs_only_and_never_drops_retries(db_path):
    queue = litequeue.Queue(db_path, max_depth=1)
    try:
        first = queue.enqueue("echo")
        job = claim_one(queue)                         # running: no longer queued
        second = queue.enqueue("echo")                 # fits: 1 queued
        with pytest.raises(litequeue.QueueFull):
            queue.enqueue("echo")
        assert queue.fail(first, "w1", job.attempts, "boom") == "queued"   # a retry is kept
        assert queue.stats()["jobs"]["queued"] == 2
        assert {j.id for j in queue.jobs(state="queued")} == {first, second}
    finally:
        queue.close()


# -- enqueue_many ------------------------------------------------------------------------------

def test_enqueue_many_returns_ids_in_order(queue):
    ids = queue.enqueue_many([
        "echo",
        ("echo", {"n": 2}),
        {"task": "sleep", "payload": {"seconds": 0}, "priority": "high"},
    ])
    assert len(ids) == 3 and len(set(ids)) == 3
    jobs = [queue.get(i) for i in ids]
    assert [j.task for j in jobs] == ["echo", "echo", "sleep"]
    assert jobs[1].payload == {"n": 2} and jobs[2].priority == "high"


def test_enqueue_many_is_all_or_nothing_on_bad_input(queue):
    queue.enqueue("echo")
    before, digest = snapshot(queue.path), file_digest(queue.path)
    with pytest.raises(litequeue.BadPriority):
        queue.enqueue_many([("echo", 1), {"task": "echo", "priority": "urgent"}, ("echo", 3)])
    with pytest.raises(litequeue.BadPayload):
        queue.enqueue_many([("echo", 1), ("echo", {1, 2})])
    with pytest.raises(litequeue.BadInput):
        queue.enqueue_many([("echo", 1), 42])
    assert snapshot(queue.path) == before
    assert file_digest(queue.path) == digest


def test_enqueue_many_is_all_or_nothing_when_full(db_path):
    queue = litequeue.Queue(db_path, max_depth=3)
    try:
        queue.enqueue("echo")
        before = snapshot(db_path)
        with pytest.raises(litequeue.QueueFull):
            queue.enqueue_many(["echo", "echo", "echo"])
        assert snapshot(db_path) == before
        assert len(queue.enqueue_many(["echo", "echo"])) == 2
    finally:
        queue.close()


def test_enqueue_many_dedupes_unique_keys(queue):
    existing = queue.enqueue("echo", unique="a")
    ids = queue.enqueue_many([{"task": "echo", "unique": "a"}, {"task": "echo", "unique": "b"},
                              {"task": "echo", "unique": "b"}])
    assert ids[0] == existing
    assert ids[1] == ids[2] and ids[1] != existing
    assert queue.stats()["jobs"]["queued"] == 2


def test_enqueue_many_same_unique_key_twice_counts_once_for_depth(db_path):
    queue = litequeue.Queue(db_path, max_depth=1)
    try:
        ids = queue.enqueue_many([{"task": "echo", "unique": "k"},
                                  {"task": "echo", "unique": "k"}])
        assert ids[0] == ids[1]
        assert queue.stats()["jobs"]["queued"] == 1
    finally:
        queue.close()


# -- claim, lease, complete, fail, requeue ---------------------------------------------------

def test_claim_takes_due_job_charges_attempt_and_sets_owner(queue):
    with frozen(T0):
        job_id = queue.enqueue("echo", {"x": 1})
    job = claim_one(queue, owner="host:1:1", at=T0 + 1)
    assert job.id == job_id and job.state == "running"
    assert job.owner == "host:1:1" and job.attempts == 1
    assert job.started_at == pytest.approx(T0 + 1)
    assert queue.claim("host:2:2", at=T0 + 1) == []              # claimed once
    assert transitions(queue, job_id)[-1] == ("queued", "running")


def test_complete_stores_result(queue):
    job_id = queue.enqueue("echo")
    job = claim_one(queue)
    queue.complete(job_id, "w1", job.attempts, {"pages": 100})
    done = queue.get(job_id)
    assert done.state == "done" and done.result == {"pages": 100}
    assert done.owner is None and done.finished_at is not None


def test_complete_and_claim_is_one_commit_taking_the_next_job_by_priority(queue):
    first = queue.enqueue("echo", {"n": 1})
    low = queue.enqueue("echo", {"n": 2}, priority="low")
    high = queue.enqueue("echo", {"n": 3}, priority="high")
    job = queue.claim("w1", priorities=(2,))[0]
    assert job.id == first
    commits = queue.conn.total_changes()
    following = queue.complete_and_claim(first, "w1", job.attempts, {"ok": 1}, tasks=["echo"],
                                         priorities=(0, 1, 2, 3), pid=4242)
    assert following.id == high and following.state == "running"
    assert (following.owner, following.attempts, following.pid) == ("w1", 1, 4242)
    assert queue.get(first).state == "done" and queue.get(first).result == {"ok": 1}
    assert queue.conn.total_changes() > commits
    # Only the priorities allowed (the supervisor's memory level) are claimed.
    assert queue.complete_and_claim(high, "w1", 1, None, priorities=(0, 1)) is None
    assert queue.get(low).state == "queued"


def test_complete_and_claim_with_a_lost_lease_claims_nothing(queue):
    job_id = queue.enqueue("echo")
    other = queue.enqueue("echo")
    job = claim_one(queue, owner="w1")
    with pytest.raises(litequeue.LeaseLost):
        queue.complete_and_claim(job_id, "w2", job.attempts, None)
    assert queue.get(other).state == "queued"             # rolled back with the complete
    assert queue.get(job_id).state == "running"


class _SyncCounter(apsw.VFS):
    """The default VFS, counting the syncs (fsyncs) of the files it opens."""

    def __init__(self):
        self.syncs = 0
        super().__init__("sync-counter", "unix", makedefault=True)

    def xOpen(self, name, flags):
        return _CountedFile(self, name, flags)


class _CountedFile(apsw.VFSFile):
    def __init__(self, vfs, name, flags):
        self.vfs = vfs
        super().__init__("unix", name, flags)

    def xSync(self, flags):
        self.vfs.syncs += 1
        return super().xSync(flags)


def test_a_claim_is_not_fsynced_but_enqueue_and_complete_are(tmp_path):
    """A claim records only a lease: should power fail before a later commit syncs the WAL,
    the job is queued again, as recovery would make it. Enqueue and complete (the job and
    its result) are each synced before they return. Counted at the VFS, for real."""
    counter = _SyncCounter()
    try:
        queue = litequeue.Queue(str(tmp_path / "q.db"))
        syncs = lambda: counter.syncs                      # noqa: E731
        before = syncs()
        job_id = queue.enqueue("echo")
        after_enqueue = syncs()
        job = claim_one(queue)
        after_claim = syncs()
        queue.complete(job_id, "w1", job.attempts, {"ok": 1})
        after_complete = syncs()
        assert after_enqueue > before
        assert after_claim == after_enqueue
        assert after_complete > after_claim
        assert queue.conn.execute("PRAGMA synchronous").fetchall()[0][0] == 2     # FULL again
        queue.close()
    finally:
        counter.unregister()


@pytest.mark.parametrize("action", ["complete", "fail", "requeue", "save_checkpoint"])
def test_wrong_owner_or_stale_attempt_raises_lease_lost(queue, action):
    job_id = queue.enqueue("echo")
    job = claim_one(queue, owner="w1")
    calls = {
        "complete": lambda owner, attempt: queue.complete(job_id, owner, attempt, {}),
        "fail": lambda owner, attempt: queue.fail(job_id, owner, attempt, "err"),
        "requeue": lambda owner, attempt: queue.requeue(job_id, owner, attempt, "x",
                                                        charge=False),
        "save_checkpoint": lambda owner, attempt: queue.save_checkpoint(job_id, owner,
                                                                        attempt, {"p": 1}),
    }
    before = snapshot(queue.path)
    with pytest.raises(litequeue.LeaseLost):
        calls[action]("w2", job.attempts)
    with pytest.raises(litequeue.LeaseLost):
        calls[action]("w1", job.attempts + 1)
    assert snapshot(queue.path) == before
    assert queue.get(job_id).state == "running"


def test_lease_is_lost_once_the_job_moved_on(queue):
    job_id = queue.enqueue("echo")
    first = claim_one(queue, owner="w1", at=litequeue.now())
    queue.fail(job_id, "w1", first.attempts, "boom")               # back to queued
    second = claim_one(queue, owner="w2", at=litequeue.now() + 3600)
    assert second.attempts == 2
    with pytest.raises(litequeue.LeaseLost):                        # the old lease
        queue.complete(job_id, "w1", first.attempts, "late")
    queue.complete(job_id, "w2", second.attempts, "ok")
    with pytest.raises(litequeue.LeaseLost):                        # already done
        queue.complete(job_id, "w2", second.attempts, "twice")
    assert queue.get(job_id).result == "ok"


def test_fail_retries_with_backoff_then_dead_with_error(queue):
    with frozen(T0) as clock:
        job_id = queue.enqueue("echo", max_attempts=3)
        at = T0
        for attempt in (1, 2):
            job = claim_one(queue, at=at)
            assert job.attempts == attempt
            error = f"Traceback ...\nValueError: attempt {attempt}"
            assert queue.fail(job_id, "w1", attempt, error) == "queued"
            failed = queue.get(job_id)
            wait = failed.due_at - at
            nominal = litequeue.BACKOFF_BASE_S * 2 ** (attempt - 1)
            assert 0.8 * nominal - 1e-6 <= wait <= 1.2 * nominal + 1e-6
            assert failed.state == "queued" and failed.error == error and failed.owner is None
            assert queue.claim("w1", at=failed.due_at - 0.01) == []    # backing off
            at = failed.due_at
            clock.move_to(datetime.datetime.fromtimestamp(at, datetime.timezone.utc))
        job = claim_one(queue, at=at)
        assert job.attempts == 3
        final_error = "Traceback (most recent call last):\n  ...\nKeyError: 'gone'"
        assert queue.fail(job_id, "w1", 3, final_error) == "dead"
    dead = queue.get(job_id)
    assert dead.state == "dead" and dead.error == final_error
    assert dead.finished_at is not None and dead.attempts == 3
    assert transitions(queue, job_id)[-1] == ("running", "dead")


def test_fail_not_retryable_is_dead_at_once(queue):
    job_id = queue.enqueue("echo", max_attempts=5)
    job = claim_one(queue)
    assert queue.fail(job_id, "w1", job.attempts, "bad payload", retryable=False) == "dead"
    assert queue.get(job_id).state == "dead" and queue.get(job_id).error == "bad payload"


def test_a_permanent_failure_is_dead_at_once_with_its_reason(queue):
    """What a task raising litequeue.Permanent("why") comes to: fail(retryable=False,
    breaker_failure=False), whatever attempts are left."""
    assert "Permanent" in litequeue.__all__
    assert issubclass(litequeue.Permanent, Exception)
    assert not issubclass(litequeue.Permanent, litequeue.Error)     # a signal, not an error
    reason = str(litequeue.Permanent("document 7 does not exist"))
    job_id = queue.enqueue("echo", max_attempts=5)
    job = claim_one(queue)
    assert queue.fail(job_id, "w1", job.attempts, reason, retryable=False,
                      breaker_failure=False) == "dead"
    dead = queue.get(job_id)
    assert (dead.state, dead.error, dead.attempts, dead.max_attempts) == ("dead", reason, 1, 5)
    assert queue.events(job_id=job_id, kind="job")[-1]["reason"] == reason


def test_backoff_doubles_within_jitter_bounds_and_is_capped():
    for attempts in range(1, 12):
        nominal = min(litequeue.BACKOFF_CAP_S, litequeue.BACKOFF_BASE_S * 2 ** (attempts - 1))
        low = litequeue.backoff_s(attempts, rand=lambda: 0.0)
        high = litequeue.backoff_s(attempts, rand=lambda: 0.999999)
        assert low == pytest.approx(0.8 * nominal)
        assert high == pytest.approx(min(litequeue.BACKOFF_CAP_S, 1.2 * nominal), rel=1e-5)
        for _ in range(20):
            assert low <= litequeue.backoff_s(attempts) <= high
    assert litequeue.backoff_s(30) <= litequeue.BACKOFF_CAP_S


def test_backoff_is_capped_for_any_attempt_count():
    # max_attempts has no upper bound, so a job may fail a thousand times and more
    for attempts in (1025, 5000, 10**6):
        assert 0 < litequeue.backoff_s(attempts) <= litequeue.BACKOFF_CAP_S


def test_requeue_without_charge_refunds_the_attempt(queue):
    job_id = queue.enqueue("echo", max_attempts=2)
    job = claim_one(queue)
    assert queue.requeue(job_id, "w1", job.attempts, "preempted", charge=False,
                         preempted=True) == "queued"
    job = queue.get(job_id)
    assert job.state == "queued" and job.attempts == 0 and job.preemptions == 1
    job = claim_one(queue)
    assert queue.requeue(job_id, "w1", job.attempts, "killed", charge=True) == "queued"
    assert queue.get(job_id).attempts == 1
    job = claim_one(queue)
    assert job.attempts == 2
    assert queue.requeue(job_id, "w1", job.attempts, "memory pressure", charge=True) == "dead"
    assert queue.get(job_id).state == "dead"


def test_checkpoints_save_and_load(queue, db_path):
    job_id = queue.enqueue("echo")
    assert queue.load_checkpoint(job_id) is None
    job = claim_one(queue)
    queue.save_checkpoint(job_id, "w1", job.attempts, {"page": 3, "seen": ["a"]})
    assert queue.load_checkpoint(job_id) == {"page": 3, "seen": ["a"]}
    queue.save_checkpoint(job_id, "w1", job.attempts, {"page": 4, "seen": ["a", "b"]})
    with pytest.raises(litequeue.BadPayload):
        queue.save_checkpoint(job_id, "w1", job.attempts, {"bad": float("nan")})
    queue.requeue(job_id, "w1", job.attempts, "preempted", charge=False)

    reader = litequeue.Queue(db_path)                 # durable: another connection sees it
    try:
        assert reader.load_checkpoint(job_id) == {"page": 4, "seen": ["a", "b"]}
        again = claim_one(reader, owner="w2")
        assert again.checkpoint == {"page": 4, "seen": ["a", "b"]}
        assert again.checkpoint_at is not None
    finally:
        reader.close()


def test_context_save_checkpoints_and_stops_when_asked(queue):
    job_id = queue.enqueue("echo")
    job = claim_one(queue)
    ctx = litequeue.Context(queue, job, "w1")
    assert ctx.checkpoint is None and not ctx.stopping
    ctx.save({"i": 1})
    ctx.ask_stop()
    assert ctx.stopping
    with pytest.raises(litequeue.StopRequested):
        ctx.save({"i": 2})
    assert queue.load_checkpoint(job_id) == {"i": 2}
    assert not issubclass(litequeue.StopRequested, Exception)


# -- events -------------------------------------------------------------------------------------

def test_every_state_change_writes_an_event(queue):
    with frozen(T0):
        a = queue.enqueue("echo", max_attempts=2)
        b = queue.enqueue("echo", ttl=5)
        c = queue.enqueue("echo")
        job = claim_one(queue, at=T0, tasks=["echo"])
        assert job.id == a
        queue.fail(a, "w1", 1, "first")                       # running -> queued
        queue.cancel(c)                                       # queued -> cancelled
        queue.retry(c)                                        # cancelled -> queued
    queue.expire(at=T0 + 6)                                   # b: queued -> skipped
    job = claim_one(queue, at=T0 + 10)                        # c: due T0, before a's retry
    assert job.id == c
    queue.complete(c, "w1", job.attempts, 1)
    job = claim_one(queue, at=T0 + 10)
    assert job.id == a
    queue.requeue(a, "w1", job.attempts, "shutdown", charge=False)
    job = claim_one(queue, at=T0 + 10)
    assert queue.fail(a, "w1", job.attempts, "second") == "dead"

    assert transitions(queue, a) == [("queued", "running"), ("running", "queued"),
                                     ("queued", "running"), ("running", "queued"),
                                     ("queued", "running"), ("running", "dead")]
    assert transitions(queue, b) == [("queued", "skipped")]
    assert transitions(queue, c) == [("queued", "cancelled"), ("cancelled", "queued"),
                                     ("queued", "running"), ("running", "done")]
    for event in queue.events(kind="job"):
        assert event["at"] is not None and event["task"] == "echo"


def test_creation_is_the_row_and_every_change_after_it_an_event(queue):
    with frozen(T0):
        job_id = queue.enqueue("echo")
    assert queue.get(job_id).created_at == pytest.approx(T0)
    assert queue.events(job_id=job_id) == []
    with frozen(T0 + 1):
        job = queue.claim("w")[0]
    events = queue.events(job_id=job_id, kind="job")
    assert [(e["from_state"], e["to_state"]) for e in events] == [("queued", "running")]
    assert events[0]["at"] == pytest.approx(T0 + 1) and job.id == job_id


# -- bad input ------------------------------------------------------------------------------------

BAD_ENQUEUES = [
    ("payload-set", dict(payload={1, 2}), litequeue.BadPayload),
    ("payload-nan", dict(payload={"x": float("nan")}), litequeue.BadPayload),
    ("payload-inf", dict(payload=[float("inf")]), litequeue.BadPayload),
    ("payload-object", dict(payload=object()), litequeue.BadPayload),
    ("payload-too-large", dict(payload="x" * litequeue.MAX_PAYLOAD_BYTES), litequeue.BadPayload),
    ("priority-name", dict(priority="urgent"), litequeue.BadPriority),
    ("priority-number", dict(priority=7), litequeue.BadPriority),
    ("priority-bool", dict(priority=True), litequeue.BadPriority),
    ("delay-negative", dict(delay=-1), litequeue.BadInput),
    ("delay-negative-text", dict(delay="-5s"), litequeue.BadInput),
    ("delay-nan", dict(delay=float("nan")), litequeue.BadInput),
    ("delay-inf", dict(delay=float("inf")), litequeue.BadInput),
    ("delay-text-inf", dict(delay="inf"), litequeue.BadInput),
    ("delay-garbage", dict(delay="soon"), litequeue.BadInput),
    ("ttl-zero", dict(ttl=0), litequeue.BadInput),
    ("max-attempts-zero", dict(max_attempts=0), litequeue.BadInput),
    ("memory-limit-unit", dict(memory_limit="12Q"), litequeue.BadInput),
    ("memory-limit-zero", dict(memory_limit="0"), litequeue.BadInput),
    ("memory-limit-negative", dict(memory_limit="-1M"), litequeue.BadInput),
    ("memory-limit-empty", dict(memory_limit=""), litequeue.BadInput),
    ("memory-limit-words", dict(memory_limit="lots"), litequeue.BadInput),
    ("unique-empty", dict(unique=""), litequeue.BadInput),
    ("payload-lone-surrogate", dict(payload="\ud800"), litequeue.BadPayload),
    ("payload-key-lone-surrogate", dict(payload={"\udc00": 1}), litequeue.BadPayload),
    ("unique-lone-surrogate", dict(unique="key\udc00"), litequeue.BadInput),
]


@pytest.mark.parametrize("kwargs, error", [(k, e) for _, k, e in BAD_ENQUEUES],
                         ids=[name for name, _, _ in BAD_ENQUEUES])
def test_bad_enqueue_raises_and_writes_nothing(queue, kwargs, error):
    queue.enqueue("echo")                    # a file with something in it
    before, digest = snapshot(queue.path), file_digest(queue.path)
    with pytest.raises(error) as info:
        queue.enqueue("echo", **kwargs)
    assert isinstance(info.value, litequeue.BadInput)
    assert str(info.value)                   # a message a user can read
    assert snapshot(queue.path) == before
    assert file_digest(queue.path) == digest


@pytest.mark.parametrize("name", ["", "x" * (litequeue.MAX_NAME_CHARS + 1), "a\0b", None, 3,
                                  "ec\ud800ho"])
def test_bad_task_name_raises_and_writes_nothing(queue, name):
    before = snapshot(queue.path)
    with pytest.raises(litequeue.BadInput):
        queue.enqueue(name)
    assert snapshot(queue.path) == before


def test_payload_size_limit_boundary(queue):
    limit = litequeue.MAX_PAYLOAD_BYTES
    fits = "x" * (limit - 2)                 # JSON adds the two quotes: exactly the limit
    job_id = queue.enqueue("echo", fits)
    assert queue.get(job_id).payload == fits
    with pytest.raises(litequeue.BadPayload):
        queue.enqueue("echo", "x" * (limit - 1))


def test_payload_size_limit_counts_utf8_bytes(queue):
    # 2 bytes per character: under the limit in characters, over it in bytes
    payload = "\u00e9" * (litequeue.MAX_PAYLOAD_BYTES // 2 + 100)
    before = snapshot(queue.path)
    with pytest.raises(litequeue.BadPayload):
        queue.enqueue("echo", payload)
    assert snapshot(queue.path) == before


def test_result_must_be_json(queue):
    job_id = queue.enqueue("echo")
    job = claim_one(queue)
    with pytest.raises(litequeue.BadPayload):
        queue.complete(job_id, "w1", job.attempts, {"when": object()})
    assert queue.get(job_id).state == "running"


@pytest.mark.parametrize("options, error", [
    (dict(priority="urgent"), litequeue.BadPriority),
    (dict(memory_limit="400X"), litequeue.BadInput),
    (dict(memory_limit="-400M"), litequeue.BadInput),
    (dict(max_attempts=0), litequeue.BadInput),
    (dict(timeout=-1), litequeue.BadInput),
    (dict(ttl="forever"), litequeue.BadInput),
], ids=["priority", "memory-unit", "memory-negative", "attempts", "timeout", "ttl"])
def test_bad_task_declaration_is_refused_and_not_stored(queue, options, error):
    before = snapshot(queue.path)
    with pytest.raises(error):
        @queue.task(**options)
        def broken(ctx):
            return None
    assert "broken" not in queue.registry
    assert "broken" not in queue.catalogue()
    assert snapshot(queue.path) == before


@pytest.mark.parametrize("text, expected", [
    ("400M", 400 * 2**20), ("1G", 2**30), ("512MiB", 512 * 2**20), ("1024", 1024),
    ("64k", 64 * 2**10), ("2g", 2 * 2**30), ("1.5G", 3 * 2**29), ("100MB", 100 * 2**20),
    (4096, 4096),
])
def test_parse_size(text, expected):
    assert litequeue.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "M", "12Q", "-1M", "0", "1.5.5G", "nan", "inf",
                                  True, -5])
def test_parse_size_refuses_bad_sizes(text):
    with pytest.raises(litequeue.BadInput):
        litequeue.parse_size(text)


@pytest.mark.parametrize("text, expected", [
    ("30s", 30.0), ("5m", 300.0), ("7d", 7 * 86400.0), ("2h", 7200.0), ("90", 90.0),
    ("1.5", 1.5), (0, 0.0), (12, 12.0),
])
def test_parse_duration(text, expected):
    assert litequeue.parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "soon", "5x", "-1", "-5m", "nan", "inf", math.inf,
                                  math.nan, True])
def test_parse_duration_refuses_bad_durations(text):
    with pytest.raises(litequeue.BadInput):
        litequeue.parse_duration(text)


def test_errors_form_one_hierarchy():
    for name in ("BadInput", "UnknownTask", "BadPriority", "BadPayload", "JobNotFound",
                 "InvalidState", "QueueFull", "LeaseLost", "DatabaseUnusable"):
        assert issubclass(getattr(litequeue, name), litequeue.Error), name
    for name in ("BadPriority", "BadPayload", "UnknownTask", "JobNotFound"):
        assert issubclass(getattr(litequeue, name), litequeue.BadInput), name
    assert litequeue.BadInput.exit_code == 2
    assert litequeue.QueueFull.exit_code == 3
    assert litequeue.DatabaseUnusable.exit_code == 4
