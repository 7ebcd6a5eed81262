"""What an operator sees of a real supervisor: each running job's pid in `status` and
`jobs show`, a supervisor killed with -9 gone from `status` at once (same host), and a job's
error that says what was wrong with its result."""

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

import litequeue
from conftest import SCRIPT, run_cli, status_json, wait_for, write_app


@pytest.fixture
def serve(db_path, tmp_path):
    """A real `python litequeue.py serve` (built-in tasks), its log in a file; killed after."""
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen([sys.executable, SCRIPT, "serve", "--db", db_path],
                                stdout=log, stderr=log)
    with litequeue.Queue(db_path) as q:
        wait_for(lambda: proc.poll() is not None
                 or any(s["pid"] == proc.pid for s in q.live_supervisors()), timeout=30)
    assert proc.poll() is None, (tmp_path / "serve.log").read_text()
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def test_status_and_jobs_show_give_a_running_jobs_pid(db_path, serve):
    with litequeue.Queue(db_path) as q:
        job_id = q.enqueue("sleep", {"seconds": 60})
    # The supervisor reports its children's pids with its heartbeat (every 2 s).
    running = wait_for(lambda: [r for r in status_json(db_path)["running"]
                                if r["id"] == job_id and r["pid"] is not None], timeout=30)
    pid = running[0]["pid"]
    assert pid in {child.pid for child in psutil.Process(serve.pid).children()}
    shown = run_cli("jobs", "show", job_id, db=db_path)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["pid"] == pid
    with litequeue.Queue(db_path) as q:
        assert q.get(job_id).pid == pid
    assert f"pid {pid}" in run_cli("status", db=db_path).stdout


def test_a_supervisor_killed_with_sigkill_leaves_status_at_once(db_path, serve):
    assert [s["pid"] for s in status_json(db_path)["supervisors"]] == [serve.pid]
    os.kill(serve.pid, signal.SIGKILL)
    serve.wait(timeout=30)
    # Its row is still in the file (no other supervisor recovered it) and its lease is fresh
    # for 30 s more; on this host, its pid says it is gone.
    with litequeue.Queue(db_path) as q:
        assert [row["pid"] for row in q._read("SELECT pid FROM supervisors")] == [serve.pid]
    assert status_json(db_path)["supervisors"] == []


def test_a_result_too_large_is_reported_as_too_large_not_as_not_json(tmp_path, db_path):
    app = write_app(tmp_path, """
        @queue.task(max_attempts=1)
        def big(ctx):
            return {"blob": "x" * (2 * 1024 * 1024)}          # JSON, 2 MiB

        @queue.task(max_attempts=1)
        def odd(ctx):
            return {1, 2}                                      # not JSON at all
    """)
    with litequeue.Queue(db_path) as q:
        big, odd = q.enqueue("big"), q.enqueue("odd")
    served = run_cli("serve", "--app", app, "--burst", db=db_path, env={"LITEQUEUE_DB": db_path},
                     timeout=120)
    assert served.returncode == 0, served.stderr
    with litequeue.Queue(db_path) as q:
        big_job, odd_job = q.get(big), q.get(odd)
    assert big_job.state == "dead"
    assert "too large" in big_job.error and "not JSON" not in big_job.error
    assert "2 MiB" in big_job.error and "the limit is 1 MiB" in big_job.error
    assert odd_job.state == "dead" and "not JSON" in odd_job.error
