"""The user_version ladder: a file made by an older litequeue is migrated in place to the
current schema, equal to a fresh file, with its jobs kept."""

import os

import apsw
import pytest

import litequeue

OLD_VERSIONS = (1, 2, 3, 4)


def make_old_file(path, version=1):
    """A file as litequeue with that schema version made it (a frozen copy of its schema.sql
    in tests/data), holding an old job whose options differ from its task's catalogue row."""
    conn = apsw.Connection(str(path))
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN")
    with open(os.path.join(os.path.dirname(__file__), "data", f"schema_v{version}.sql")) as f:
        conn.execute(f.read())
    conn.execute("INSERT INTO tasks (name, priority, max_attempts, shed, unique_task, updated_at)"
                 " VALUES ('heartbeat', 3, 1, 1, 1, 0)")
    conn.execute("INSERT INTO tasks (name, priority, max_attempts, timeout_s,"
                 " memory_limit_bytes, updated_at) VALUES ('echo', 2, 7, 30, 67108864, 0)")
    conn.execute("INSERT INTO jobs (task, priority, state, max_attempts, created_at, due_at)"
                 " VALUES ('echo', 2, 'queued', 3, 1, 1)")
    conn.execute(f"PRAGMA application_id = {litequeue.APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version = {version}")
    conn.execute("COMMIT")
    conn.close()


def shape(path):
    """Every table's columns and every index's definition: what the schema is, not its text."""
    conn = apsw.Connection(str(path))
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")]
        columns = {t: conn.execute(f"PRAGMA table_info({t})").fetchall() for t in tables}
        indexes = conn.execute("SELECT name, tbl_name, sql FROM sqlite_schema"
                               " WHERE type = 'index' ORDER BY name").fetchall()
        version = conn.execute("PRAGMA user_version").fetchall()[0][0]
        return columns, indexes, version
    finally:
        conn.close()


@pytest.mark.parametrize("version", OLD_VERSIONS)
def test_an_old_file_migrates_to_equal_a_fresh_one(tmp_path, version):
    old, fresh = tmp_path / "old.db", tmp_path / "fresh.db"
    make_old_file(old, version)
    assert shape(old)[2] == version
    litequeue.Queue(str(fresh)).close()
    with litequeue.Queue(str(old)) as queue:            # opening migrates
        assert queue.get(1).task == "echo"                # the old job is kept
        job_id = queue.enqueue("echo", {"after": "migration"})
        (job,) = queue.claim("w")
        assert job.id == 1                                # its options as they were
        assert (job.max_attempts, job.timeout_s, job.memory_limit_bytes) == (3, None, None)
        (job,) = queue.claim("w")
        assert job.id == job_id                           # a new one follows the catalogue
        assert (job.max_attempts, job.timeout_s, job.memory_limit_bytes) == (7, 30, 64 << 20)

    assert shape(old) == shape(fresh)
    assert shape(old)[2] == litequeue.SCHEMA_VERSION == 5
    with litequeue.Queue(str(old)) as queue:
        assert queue.get(job_id).payload == {"after": "migration"}


def test_the_migrated_catalogue_takes_per_task_breaker_thresholds(tmp_path):
    old = tmp_path / "old.db"
    make_old_file(old, 1)
    with litequeue.Queue(str(old)) as queue:
        queue.task(lambda ctx: None, name="fragile", breaker_failures=1)
        assert queue.catalogue()["fragile"].breaker_failures == 1
        assert queue.catalogue()["heartbeat"].breaker_failures is None
