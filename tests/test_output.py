"""Job output on disk (issue 11): a job's child writes its fds 1 and 2 to
`<db>-output/<id>.log`, one marker line per attempt, `ctx.emit` for str and bytes, the
output limit, reading it back (`Queue.output`, `jobs output [--follow] [--tail]`), purge,
and the directory's safety. Real children through a real Supervisor driven by step(), and
real `python litequeue.py` runs for the command line."""

import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

import litequeue
from conftest import SCRIPT, integrity_ok, run_cli, start_serve, wait_for, write_app
from test_disk_full import stored_jobs
from test_pool import finish, step_until, stepped_supervisor

pytestmark = pytest.mark.filterwarnings("ignore::litequeue.UnknownTaskWarning")

MiB = 1 << 20
MARKER = litequeue.OUTPUT_MARKER.encode()


def run_to_end(queue, job_ids, timeout=30, **options):
    """Run jobs through a stepped supervisor until none of them is queued or running."""
    sup = stepped_supervisor(queue, poll=0.05, grace=1, **options)
    try:
        step_until(sup, lambda: all(queue.get(i).state in litequeue.FINAL_STATES
                                    for i in job_ids), timeout=timeout)
    finally:
        finish(sup)
    return sup


def body(output):
    """An output without its marker lines."""
    return b"".join(line for line in output.splitlines(keepends=True)
                    if not line.startswith(MARKER))


def test_print_stderr_logging_and_subprocesses_land_in_order_after_the_marker(queue):
    @queue.task
    def talk(ctx):
        import logging
        print("one", end="")                         # no newline: still before "two"
        subprocess.run(["echo", "two"], check=True)
        print("three", file=sys.stderr)
        logging.basicConfig(stream=sys.stderr, format="%(message)s", force=True)
        logging.getLogger("task").error("four")
        subprocess.run(["sh", "-c", "echo five >&2"], check=True)
        ctx.emit("six\n")
        print("seven")
        return "ok"

    job_id = queue.enqueue("talk")
    run_to_end(queue, [job_id])
    assert queue.get(job_id).state == "done", queue.get(job_id).error
    output = queue.output(job_id)
    first, rest = output.split(b"\n", 1)
    assert first.startswith(MARKER) and b"attempt 1/3: first run" in first, first
    assert rest == b"onetwo\nthree\nfour\nfive\nsix\nseven\n"
    path = queue.output_path(job_id)
    assert path == os.path.join(f"{queue.path}-output", f"{job_id}.log")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700


def test_buffered_print_stays_in_order_with_programs_logging_forks_and_the_traceback(queue):
    """sys.stdout is block-buffered in the child; whatever else writes to the file flushes
    it first: subprocess, os.system, os.fork, logging to stderr, and the task's end."""
    big = "b" * (200 * 1024)                             # past the 64 KiB buffer, no newline

    @queue.task(max_attempts=1)
    def mixed(ctx):
        import logging
        logging.basicConfig(stream=sys.stderr, format="%(message)s", force=True)
        print("p1")
        subprocess.run(["echo", "s1"], check=True)
        print("p2")
        logging.getLogger("task").error("e1")
        print("p3")
        print(big, end="")
        subprocess.run(["echo", "s2"], check=True)
        print("p4", end="")
        os.system("echo s3")
        print("p5")
        pid = os.fork()
        if pid == 0:
            os.write(1, b"f1\n")
            os._exit(0)
        os.waitpid(pid, 0)
        print("p6")
        raise RuntimeError("the end")

    job_id = queue.enqueue("mixed")
    run_to_end(queue, [job_id])
    job = queue.get(job_id)
    assert job.state == "dead" and "RuntimeError: the end" in job.error, job.error
    lines = body(queue.output(job_id)).decode().splitlines()
    assert lines[:6] == ["p1", "s1", "p2", "e1", "p3", big + "s2"], lines[:5]
    assert lines[6:10] == ["p4s3", "p5", "f1", "p6"], lines[6:]
    assert lines[10] == "Traceback (most recent call last):" and lines[-1] == "RuntimeError: the end"


def test_a_pooled_childs_buffered_print_goes_to_its_own_jobs_file(queue):
    @queue.task
    def quiet(ctx, n):
        print(f"job {n}", end="")                        # no newline, no flush: left buffered
        return n

    ids = [queue.enqueue("quiet", {"n": n}) for n in range(3)]
    run_to_end(queue, ids, slots=1, jobs_per_child=3)
    for n, job_id in enumerate(ids):
        assert body(queue.output(job_id)) == f"job {n}".encode()


def test_a_retried_job_has_a_marker_per_attempt_and_its_traceback_between(queue):
    @queue.task(max_attempts=2)
    def flaky(ctx):
        print(f"attempt {ctx.attempt}")
        if ctx.attempt == 1:
            raise ValueError("first attempt fails")
        return ctx.attempt

    job_id = queue.enqueue("flaky")
    run_to_end(queue, [job_id])
    assert queue.get(job_id).state == "done"
    lines = queue.output(job_id).decode().splitlines()
    markers = [line for line in lines if line.startswith(litequeue.OUTPUT_MARKER)]
    assert len(markers) == 2, lines
    assert "attempt 1/2: first run" in markers[0] and "attempt 2/2: retry" in markers[1]
    assert lines.index(markers[1]) > lines.index("ValueError: first attempt fails")
    assert lines[-1] == "attempt 2"


def test_a_pooled_child_writes_each_job_to_its_own_file(queue):
    @queue.task
    def whoami(ctx, n):
        print(f"job {n} in {os.getpid()}")
        return os.getpid()

    ids = [queue.enqueue("whoami", {"n": n}) for n in range(3)]
    run_to_end(queue, ids, slots=1, jobs_per_child=3)
    pids = {queue.get(i).result for i in ids}
    assert len(pids) == 1, pids                              # one child ran them all
    (pid,) = pids
    for n, job_id in enumerate(ids):
        assert body(queue.output(job_id)) == f"job {n} in {pid}\n".encode()
        assert queue.output(job_id).count(MARKER) == 1


def test_a_job_resumed_after_preemption_says_so(queue):
    queue.task(lambda ctx: None, name="anything")
    job_id = queue.enqueue("anything")
    job = queue.get(job_id)
    job.attempts, job.max_attempts, job.preemptions, job.checkpoint = 1, 3, 1, {"step": 4}
    marker = litequeue.attempt_marker(job, 0.0).decode()
    assert "attempt 1/3: resumed after preemption from its checkpoint" in marker
    job.checkpoint = None
    assert "resumed after preemption (no checkpoint)" in litequeue.attempt_marker(job, 0.0).decode()


def test_emit_keeps_str_bytes_invalid_utf8_and_binary_byte_exact(queue):
    data = bytes(range(256)) * 4 + b"\xff\xfe\xc3(invalid utf-8)\x00"

    @queue.task
    def binary(ctx):
        ctx.emit("héllo ✓\n")
        ctx.emit(data)
        sys.stdout.buffer.write(b"\x80raw\n")
        sys.stdout.flush()               # stdout is buffered: a raw fd write goes around it
        os.write(1, b"\xc0\xc1 fd\n")
        return None

    job_id = queue.enqueue("binary")
    run_to_end(queue, [job_id])
    assert queue.get(job_id).state == "done", queue.get(job_id).error
    assert body(queue.output(job_id)) == "héllo ✓\n".encode() + data + b"\x80raw\n\xc0\xc1 fd\n"
    with pytest.raises(litequeue.BadInput, match="str or bytes"):
        litequeue.Context(queue, queue.get(job_id), "test").emit(42)


def test_a_100_mib_line_without_a_newline_does_not_grow_the_childs_rss(queue):
    """100 MiB without a newline, through print() and through ctx.emit, 1 MiB at a time: the
    child's RSS, measured by the task itself, stays where it was."""
    @queue.task
    def long_line(ctx, mib):
        import psutil
        me = psutil.Process()
        chunk = "x" * MiB
        before = me.memory_info().rss
        for _ in range(mib // 2):
            print(chunk, end="")
        for _ in range(mib // 2):
            ctx.emit(chunk)
        return {"grown": me.memory_info().rss - before}

    job_id = queue.enqueue("long_line", {"mib": 100})
    run_to_end(queue, [job_id], timeout=60, output_limit="1G")
    job = queue.get(job_id)
    assert job.state == "done", job.error
    assert job.result["grown"] < 4 * MiB, job.result
    path = queue.output_path(job_id)
    with open(path, "rb") as f:
        marker = f.readline()
        assert marker.startswith(MARKER) and f.read(16) == b"x" * 16
    assert os.path.getsize(path) == len(marker) + 100 * MiB


def test_a_job_writing_past_the_output_limit_is_stopped_with_that_error(queue):
    @queue.task(max_attempts=1)
    def chatty(ctx):
        for _ in range(3):
            ctx.emit(b"y" * MiB)
        time.sleep(60)                                   # never saves: killed after the grace

    job_id = queue.enqueue("chatty")
    started = time.monotonic()
    run_to_end(queue, [job_id], output_limit="1M")
    job = queue.get(job_id)
    # as a timeout's: the reason, then that the task reached no checkpoint to stop at
    assert job.state == "dead" and job.error.startswith("output limit exceeded (1 MiB)"), job.error
    assert time.monotonic() - started < 20


def test_the_output_directory_deleted_while_a_job_runs(queue, tmp_path):
    """The running job keeps writing to its (now unlinked) file and ends done; the next job
    gets a fresh directory and its output; the supervisor carries on."""
    go = tmp_path / "go"

    @queue.task
    def waits(ctx, go):
        print("before", flush=True)                      # stdout is block-buffered
        while not os.path.exists(go):
            time.sleep(0.02)
        print("after")
        return "ok"

    first = queue.enqueue("waits", {"go": str(go)})
    sup = stepped_supervisor(queue, poll=0.05, grace=1)
    try:
        step_until(sup, lambda: queue.output_path(first) is not None
                   and b"before" in queue.output(first))
        shutil.rmtree(queue.output_dir)
        go.touch()
        step_until(sup, lambda: queue.get(first).state == "done")
        assert queue.output_path(first) is None
        second = queue.enqueue("waits", {"go": str(go)})
        step_until(sup, lambda: queue.get(second).state == "done")
    finally:
        finish(sup)
    assert body(queue.output(second)) == b"before\nafter\n"
    assert stat.S_IMODE(os.stat(queue.output_dir).st_mode) == 0o700


def test_a_refused_directory_is_never_written_through_and_the_job_still_runs(queue, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    os.symlink(elsewhere, queue.output_dir)

    @queue.task(max_attempts=1)
    def fails(ctx):
        print("secret")
        raise RuntimeError("it failed")

    ok = queue.enqueue("fails")
    run_to_end(queue, [ok])
    job = queue.get(ok)
    assert job.state == "dead"
    assert "RuntimeError: it failed" in job.error
    assert "job output discarded" in job.error and "symlink" in job.error, job.error
    assert os.listdir(elsewhere) == []
    with pytest.raises(litequeue.OutputRefused, match="symlink"):
        queue.output(ok)


@pytest.fixture
def full_output_dir(queue):
    """The queue's output directory on its own 1 MiB tmpfs (mode 0700), the database beside
    it on a disk that is not full; unmounted afterwards (as test_disk_full's tiny_disk)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    os.mkdir(queue.output_dir, 0o700)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs",
                           queue.output_dir], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs was refused: {done.stderr.strip()}")
    try:
        yield queue.output_dir
    finally:
        if subprocess.run(["umount", queue.output_dir], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", queue.output_dir], capture_output=True)


def test_a_job_that_fills_the_output_disk_fails_saying_so_and_the_rest_carries_on(
        queue, full_output_dir):
    @queue.task(max_attempts=1)
    def flood(ctx):
        print("starting")
        while True:                                      # until the disk is full
            ctx.emit(b"z" * 65536)

    @queue.task(max_attempts=1)
    def after(ctx, n):
        print(f"after {n}")                              # lost: the disk is still full
        return n * 2

    flooded = queue.enqueue("flood")
    others = [queue.enqueue("after", {"n": n}) for n in range(3)]
    run_to_end(queue, [flooded, *others], output_limit="1G")
    job = queue.get(flooded)
    assert job.state == "dead", job.error
    assert "No space left on device" in job.error and "ENOSPC" in job.error, job.error
    assert os.statvfs(full_output_dir).f_bavail == 0
    assert [queue.get(i).state for i in others] == ["done"] * 3
    assert [queue.get(i).result for i in others] == [0, 2, 4]
    assert queue.output(flooded).startswith(MARKER)      # what fitted is kept, readable
    assert len(queue.output(flooded)) > 512 * 1024
    assert integrity_ok(queue.path)
    assert [row[3] for row in stored_jobs(queue.path)] == ["dead", "done", "done", "done"]


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------

APP = """
    @queue.task(max_attempts=1)
    def lines(ctx, n=3):
        for i in range(n):
            print(f"line {i}")
        return n

    @queue.task(max_attempts=1)
    def held(ctx, go):
        print("started", flush=True)
        while not os.path.exists(go):
            time.sleep(0.02)
        print("finished")
        return "ok"
"""


def serve_burst(db, app):
    return run_cli("serve", "--burst", "--app", app, "--poll", "0.05", db=db,
                   env={"LITEQUEUE_DB": str(db)})


def test_jobs_output_tail_none_missing_and_purged(tmp_path, db_path):
    app = write_app(tmp_path, APP)
    with litequeue.Queue(db_path) as q:
        ran = q.enqueue("lines", {"n": 5})
        never = q.enqueue("lines", delay=3600)
    assert serve_burst(db_path, app).returncode == 0
    shown = run_cli("jobs", "output", ran, db=db_path)
    assert shown.returncode == 0
    assert shown.stdout.splitlines()[1:] == [f"line {i}" for i in range(5)]
    assert shown.stdout.startswith(litequeue.OUTPUT_MARKER)
    tail = run_cli("jobs", "output", ran, "--tail", "2", db=db_path)
    assert (tail.returncode, tail.stdout) == (0, "line 3\nline 4\n")
    assert run_cli("jobs", "output", ran, "--tail", "0", db=db_path).stdout == ""
    assert run_cli("jobs", "output", ran, "--tail", "99", db=db_path).stdout == shown.stdout
    none = run_cli("jobs", "output", never, db=db_path)
    assert (none.returncode, none.stdout) == (0, "")
    missing = run_cli("jobs", "output", "999", db=db_path)
    assert missing.returncode == 2 and "no job 999" in missing.stderr
    import json
    show = json.loads(run_cli("jobs", "show", ran, db=db_path).stdout)
    assert show["output_bytes"] == len(shown.stdout.encode())
    path = os.path.join(f"{db_path}-output", f"{ran}.log")
    assert os.path.exists(path)
    assert run_cli("purge", "--older-than", "0", db=db_path).returncode == 0
    assert not os.path.exists(path)
    purged = run_cli("jobs", "output", ran, db=db_path)
    assert purged.returncode == 2 and f"no job {ran}" in purged.stderr


def test_follow_shows_a_running_jobs_line_and_exits_0_when_it_ends(tmp_path, db_path):
    app = write_app(tmp_path, APP)
    go = tmp_path / "go"
    with litequeue.Queue(db_path) as q:
        job_id = q.enqueue("held", {"go": str(go)})
    server = start_serve("--app", app, "--poll", "0.05", db=db_path,
                         env={"LITEQUEUE_DB": db_path})
    follow = subprocess.Popen([sys.executable, SCRIPT, "jobs", "output", str(job_id),
                               "--follow", "--db", db_path], stdout=subprocess.PIPE)
    try:
        assert follow.stdout.readline().startswith(MARKER)
        assert follow.stdout.readline() == b"started\n"       # while the job runs
        with litequeue.Queue(db_path) as q:
            status = q.status()
            assert q.get(job_id).state == "running"
            assert status["running"][0]["output_bytes"] > len(b"started\n")
        go.touch()
        assert follow.stdout.readline() == b"finished\n"
        assert follow.wait(timeout=20) == 0
    finally:
        for proc in (follow, server):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        server.stdout.close()
        server.stderr.close()
        follow.stdout.close()


@pytest.mark.parametrize("make", ["world_writable", "symlink"])
def test_an_unsafe_output_directory_is_refused_with_exit_4(tmp_path, db_path, make):
    app = write_app(tmp_path, APP)
    with litequeue.Queue(db_path) as q:
        job_id = q.enqueue("lines")
    output_dir = f"{db_path}-output"
    if make == "symlink":
        target = tmp_path / "target"
        target.mkdir(mode=0o700)
        os.symlink(target, output_dir)
        reason = "is a symlink"
    else:
        os.mkdir(output_dir)
        os.chmod(output_dir, 0o777)
        reason = "open to others"
    served = serve_burst(db_path, app)
    assert served.returncode == 4, served.stderr
    assert reason in served.stderr and len(served.stderr.strip().splitlines()) == 1
    shown = run_cli("jobs", "output", job_id, db=db_path)
    assert shown.returncode == 4 and reason in shown.stderr
    with litequeue.Queue(db_path) as q:
        assert q.get(job_id).state == "queued"               # nothing ran
