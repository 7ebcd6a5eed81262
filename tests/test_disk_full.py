"""Disk full: the database on a tmpfs of 4 MiB that a filler file fills to the last byte.
An enqueue then fails with exit 4 and a message that says the disk is full; nothing already
stored is lost; a supervisor that meets the full disk while a job runs waits it out without
crashing, spinning or losing the job; and once space is freed everything works again.

Mounting needs root: the tests skip, saying so, when not root or when mount is refused."""

import json
import os
import re
import subprocess
import threading
import time

import apsw
import pytest

import litequeue
from conftest import integrity_ok, run_cli, start_serve, wait_for, write_app

POLL_S = 0.1


@pytest.fixture
def tiny_disk(tmp_path):
    """A directory on its own 4 MiB tmpfs, unmounted afterwards whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    directory = tmp_path / "disk"
    directory.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(directory)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs was refused: {done.stderr.strip()}")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def fill(directory):
    """Write a filler file until the filesystem has not one byte left; returns its path."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in (1 << 16, 1 << 12, 1 << 9, 1):
            block = b"\0" * chunk
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    if exc.errno != 28:            # ENOSPC
                        raise
                    break
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


def stored_jobs(path):
    """(id, task, payload, state, unique_key) of every job. A read-write connection, so that
    closing it (the last one) removes the -wal and -shm, as litequeue's own close does."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE)
    try:
        return conn.execute("SELECT id, task, payload, state, unique_key FROM jobs"
                            " ORDER BY id").fetchall()
    finally:
        conn.close()


def assert_error(result, code):
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("litequeue: error: "), result.stderr


@pytest.mark.parametrize("open_elsewhere", [False, True],
                         ids=["nobody-else-has-it-open", "a-supervisor-has-it-open"])
def test_enqueue_on_a_full_disk_is_exit_4_and_loses_nothing(tiny_disk, open_elsewhere):
    """From cron: the file alone on a full disk (its -shm cannot even be made), or the file
    held open by a running supervisor (its -wal cannot grow)."""
    db = tiny_disk / "q.db"
    with litequeue.Queue(str(db)) as q:
        q.enqueue_many([("echo", {"i": i, "text": "x" * 300}) for i in range(20)])
        q.enqueue("heartbeat")
    stored = stored_jobs(db)
    holder = litequeue.Queue(str(db)) if open_elsewhere else None
    try:
        if holder is not None:
            holder.jobs()                          # its -wal and -shm are there
        assert os.path.exists(f"{db}-shm") is open_elsewhere
        filler = fill(tiny_disk)
        for payload in ({"small": 1}, {"big": "y" * 100_000}):
            result = run_cli("enqueue", "echo", "--payload", json.dumps(payload), db=db)
            assert_error(result, 4)
            assert str(db) in result.stderr
            said = result.stderr.replace(str(db), "DB")  # the test's own path says "full"
            assert re.search(r"full|no space", said, re.I), result.stderr
        status = run_cli("status", "--json", db=db)     # a read needs no new space, unless
        if status.returncode == 0:                       # the -shm cannot be made
            assert json.loads(status.stdout)["jobs"]["queued"] == len(stored)
        else:
            assert_error(status, 4)
        assert open_elsewhere is False or status.returncode == 0, status.stderr
        served = run_cli("serve", "--burst", db=db, timeout=30)
        assert_error(served, 4)
    finally:
        if holder is not None:
            holder.close()
    filler.unlink()
    assert stored_jobs(db) == stored
    assert integrity_ok(db)

    after = run_cli("enqueue", "echo", "--payload", '{"after": "space freed"}', db=db)
    assert after.returncode == 0, after.stderr
    new_id = int(after.stdout)
    served = run_cli("serve", "--burst", "--poll", "0.05", db=db, timeout=60)
    assert served.returncode == 0, served.stderr[-2000:]
    with litequeue.Queue(str(db)) as q:
        jobs = {job.id: job for job in q.jobs(limit=None)}
    assert sorted(jobs) == sorted([row[0] for row in stored] + [new_id])
    assert {job.state for job in jobs.values()} == {"done"}
    assert jobs[new_id].result == {"after": "space freed"}
    assert integrity_ok(db)


def test_a_supervisor_meeting_a_full_disk_waits_it_out_and_loses_no_job(tmp_path, tiny_disk):
    """The disk fills while a job runs; the job returns and its result cannot be written.
    The supervisor keeps running, waits (a poll at a time, not a busy loop), and once space
    is back the job ends done with its result, and the jobs queued behind it run too."""
    db = tiny_disk / "q.db"
    go, returning = tmp_path / "go", tmp_path / "returning"
    app = write_app(tmp_path, f"""
        @queue.task(priority="high", max_attempts=1)
        def gated(ctx):
            while not os.path.exists({str(go)!r}):
                time.sleep(0.01)
            open({str(returning)!r}, "w").close()
            return "r" * 50_000                  # a result that needs new pages

        @queue.task
        def quick(ctx, i):
            return {{"i": i, "text": "q" * 5_000}}
    """)
    with litequeue.Queue(str(db)) as q:
        gated = q.enqueue("gated", priority="high", max_attempts=1)
        quick = q.enqueue_many([("quick", {"i": i}) for i in range(4)])
    lines = []
    supervisor = start_serve("--app", app, "--slots", "1", "--poll", POLL_S, "--burst",
                             db=db, env={"LITEQUEUE_DB": str(db)})

    def read_stderr():
        for line in supervisor.stderr:
            lines.append(line)
    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    observer = litequeue.Queue(str(db))
    try:
        wait_for(lambda: observer.get(gated).state == "running", timeout=20)
        filler = fill(tiny_disk)
        full_at, lines_before = time.monotonic(), len(lines)
        go.touch()
        wait_for(returning.exists, timeout=10)
        wait_for(lambda: any("full" in line.replace(str(db), "DB")
                             for line in lines[lines_before:]), timeout=15)
        time.sleep(1.0)                            # the disk stays full a while
        alive_while_full = supervisor.poll() is None
        filler.unlink()
        full_s, lines_while_full = time.monotonic() - full_at, len(lines) - lines_before
        returncode = supervisor.wait(timeout=60)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
        reader.join(timeout=10)
        observer.close()
    log = "".join(lines)
    with litequeue.Queue(str(db)) as q:
        finished = q.get(gated)
        others = [q.get(job_id) for job_id in quick]
    problems = []
    if not alive_while_full:
        problems.append("the supervisor died while the disk was full")
    if returncode != 0:
        problems.append(f"serve --burst exited {returncode}")
    # A supervisor that waits logs a line or two per poll; a busy loop logs thousands.
    if lines_while_full > 20 + 5 * full_s / POLL_S:
        problems.append(f"{lines_while_full} log lines in {full_s:.1f}s of full disk: "
                        f"a busy loop, not a wait")
    if (finished.state, finished.attempts, finished.result) != ("done", 1, "r" * 50_000):
        problems.append(f"the job that ran into the full disk ended {finished.state} after "
                        f"{finished.attempts} attempt(s): {finished.error!r}")
    if [(j.state, j.result) for j in others] != [
            ("done", {"i": i, "text": "q" * 5_000}) for i in range(len(quick))]:
        problems.append(f"jobs queued behind it: {[(j.id, j.state) for j in others]}")
    if "Traceback" in log:
        problems.append("a traceback on stderr: " + log[log.index("Traceback"):][:1500])
    assert not problems, "\n".join(problems)
    assert integrity_ok(db)
