"""Shared fixtures: a queue on a real file in tmp_path, and the real CLI as a subprocess."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

import litequeue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "litequeue.py")


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "q.db")


@pytest.fixture
def queue(db_path):
    q = litequeue.Queue(db_path)
    yield q
    q.close()


def run_cli(*args, db=None, env=None, timeout=60, cwd=None, input=None):
    """`python litequeue.py ARGS` as cron or systemd would run it."""
    command = [sys.executable, SCRIPT, *map(str, args)]
    if db is not None:
        command += ["--db", str(db)]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=cwd, input=input)


def status_json(db):
    """`status --json` as the CLI prints it, parsed."""
    result = run_cli("status", "--json", db=db)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def start_serve(*args, db, cwd=None, env=None):
    """A real `python litequeue.py serve` in the background; the caller stops it."""
    command = [sys.executable, SCRIPT, "serve", "--db", str(db), *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd, env={**os.environ, **(env or {})})


def write_app(tmp_path, body, name="tasks.py"):
    """A task module like a user's, importing litequeue from this checkout."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {ROOT!r})
        from litequeue import Queue
        queue = Queue(os.environ.get("LITEQUEUE_DB", {str(tmp_path / 'app.db')!r}))
    """) + textwrap.dedent(body))
    return str(path)


def wait_for(predicate, timeout=30.0, interval=0.02):
    """Poll until predicate() is truthy; fail the test after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s: {predicate}")


def integrity_ok(path):
    import apsw
    conn = apsw.Connection(str(path))
    try:
        return conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


def job_states(path):
    q = litequeue.Queue(path)
    try:
        return {job.id: job.state for job in q.jobs(limit=None)}
    finally:
        q.close()


def file_digest(path):
    """sha256 of the database file and its WAL (a missing WAL counts as empty), so that a
    write that only reached the WAL still shows; of a directory, its listing."""
    path = str(path)
    if os.path.isdir(path):
        return hashlib.sha256(repr(sorted(os.listdir(path))).encode()).hexdigest()
    digest = hashlib.sha256()
    for name in (path, f"{path}-wal"):
        digest.update(b"|")
        if os.path.exists(name):
            with open(name, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()
