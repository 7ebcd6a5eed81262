"""The supervisor with real processes (issue 3): every job in its own forked child under
rlimits, crash-proof leases, graceful shutdown, several supervisors on one file.

Everything here runs the real thing: `python litequeue.py serve` as a subprocess (the way
systemd and cron run it), children forked by it, real rlimits, real memory, real signals.
Tasks come from app files written by `write_app` and passed as `--app FILE.py`, with
LITEQUEUE_DB pointing the app's own Queue at the same file the supervisor serves."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

import litequeue
from conftest import SCRIPT, integrity_ok, job_states, run_cli, start_serve, wait_for, write_app

MiB = 1 << 20

# Short knobs so the whole file stays well under a minute on 2 cores.
FAST = ("--poll", "0.05", "--grace", "2", "--hold", "1")


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

class Serve:
    """A background `litequeue.py serve` whose stderr is drained by a thread (a busy
    supervisor would otherwise block on a full pipe), with its log lines kept."""

    def __init__(self, db, *args, cwd=None):
        self.db = db
        self.proc = start_serve(*args, db=db, cwd=cwd, env={"LITEQUEUE_DB": str(db)})
        self.pid = self.proc.pid
        self.lines = []
        self.seen_children = set()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def alive(self):
        return self.proc.poll() is None

    def children(self):
        """The supervisor's live children now (also remembered for the orphan check)."""
        try:
            found = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen_children.update(found)
        return found

    def rss_bytes(self):
        return psutil.Process(self.pid).memory_info().rss

    def registered(self):
        """Has it registered itself in the file (so it is serving)?"""
        with litequeue.Queue(self.db) as q:
            return any(s["pid"] == self.pid for s in q.live_supervisors())

    def wait(self, timeout=30):
        """Exit code, after the stderr reader has seen everything."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def terminate(self, timeout=30):
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self):
        if self.alive():
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def serve(db_path):
    """Start supervisors on db_path; any still running at teardown is killed (by its pid)."""
    started = []

    def start(*args, cwd=None):
        server = Serve(db_path, *args, cwd=cwd)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def burst(db, app, *args, timeout=60):
    """`serve --burst` to completion, as cron or a batch script runs it."""
    return run_cli("serve", "--burst", "--app", app, *FAST, *args, db=db,
                   env={"LITEQUEUE_DB": str(db)}, timeout=timeout)


def get(db, job_id):
    with litequeue.Queue(db) as q:
        return q.get(job_id)


def state_of(db, job_id):
    return get(db, job_id).state


def events_of(db, job_id):
    with litequeue.Queue(db) as q:
        return q.events(job_id=job_id)


def runs_of(db, job_id):
    """How many times the job was started (queued -> running transitions)."""
    return sum(1 for e in events_of(db, job_id)
               if e["kind"] == "job" and e["to_state"] == "running")


def is_gone(process):
    """Dead, or a zombie (holds no memory; reaped by whoever adopted it)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_no_children_left(server, timeout=5.0):
    """No process forked by this supervisor is still alive (zombies count as gone)."""
    children = set(server.seen_children) | set(server.children())
    wait_for(lambda: all(is_gone(p) for p in children), timeout=timeout)
    # Nothing else still names the supervisor as its parent either.
    leftovers = [p for p in psutil.process_iter(["ppid"])
                 if p.info["ppid"] == server.pid and not is_gone(p)]
    assert leftovers == []


def processes_naming(path):
    """Live processes whose command line names this file: a supervisor and its forked
    children (a fork keeps its parent's command line)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(path) in arg for arg in process.info["cmdline"] or ()) and not is_gone(process):
            found.append(process)
    return found


def one_line_per_job(lines, job_id):
    """The supervisor's log lines about one job, as (start lines, end lines)."""
    about = [line for line in lines if re.search(rf"\bjob {job_id} ", line)]
    starts = [line for line in about if " started (attempt" in line]
    return starts, [line for line in about if line not in starts]


# --------------------------------------------------------------------------------------
# A job that fails in any way fails that job only
# --------------------------------------------------------------------------------------

APP_BASICS = """
    import threading

    @queue.task
    def ok(ctx, n=0):
        return {"n": n}

    @queue.task(max_attempts=2)
    def boom(ctx):
        raise ValueError("boom from the task")

    @queue.task(max_attempts=1)
    def abort(ctx):
        os.abort()

    @queue.task(timeout=1, max_attempts=2)
    def sleepy(ctx):
        time.sleep(60)
        return "woke up"

    @queue.task(timeout=1, max_attempts=3)
    def paced(ctx, n=15, step_s=0.1):
        # Needs about 1.5 s in all: times out once, then its retry resumes and finishes.
        state = ctx.checkpoint or {"i": 0}
        started_from = state["i"]
        while state["i"] < n:
            time.sleep(step_s)
            state = {"i": state["i"] + 1}
            ctx.save(state)
        return {"started_from": started_from, "i": state["i"]}

    @queue.task(max_attempts=1)
    def threads(ctx, count=20, mb=4):
        held = []
        def work():
            block = bytearray(b"t") * (mb << 20)      # touched: resident, not lazy
            held.append(len(block))
            time.sleep(0.3)
        workers = [threading.Thread(target=work) for _ in range(count)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return {"threads": len(held), "mb": sum(held) >> 20}
"""


def test_raising_task_is_retried_then_dead_with_traceback(tmp_path, db_path, serve):
    app = write_app(tmp_path, APP_BASICS)
    server = serve("--app", app, *FAST)
    wait_for(server.registered)
    with litequeue.Queue(db_path) as q:
        bad = q.enqueue("boom")
        good = [q.enqueue("ok", {"n": i}) for i in range(4)]

    wait_for(lambda: state_of(db_path, bad) == "dead", timeout=15)
    wait_for(lambda: all(state_of(db_path, j) == "done" for j in good), timeout=10)
    job = get(db_path, bad)
    assert job.attempts == 2 and runs_of(db_path, bad) == 2     # retried once, then dead
    assert "Traceback (most recent call last)" in job.error
    assert "ValueError: boom from the task" in job.error
    assert [get(db_path, j).result for j in good] == [{"n": i} for i in range(4)]
    assert server.alive()                                       # the supervisor kept going
    assert server.terminate() == 0
    assert_no_children_left(server)


def test_abort_is_killed_by_signal_6(tmp_path, db_path):
    app = write_app(tmp_path, APP_BASICS)
    with litequeue.Queue(db_path) as q:
        aborted = q.enqueue("abort", max_attempts=1)   # the catalogue is not stored yet
        good = [q.enqueue("ok", {"n": i}) for i in range(3)]
    out = burst(db_path, app)
    assert out.returncode == 0, out.stderr
    job = get(db_path, aborted)
    assert job.state == "dead"
    assert job.error == "killed by signal 6"
    assert all(state_of(db_path, j) == "done" for j in good)
    assert integrity_ok(db_path)


APP_MEMORY = """
    import mmap

    @queue.task
    def ok(ctx, n=0):
        return {"n": n}

    @queue.task(max_attempts=1)
    def hog_1g(ctx):
        # What the child runs under, kept as its checkpoint (a failed job keeps it): the
        # test checks the rlimit was in force here, not only that the job ended.
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        with open("/proc/self/status") as f:
            vm_data = next(int(line.split()[1]) << 10 for line in f
                           if line.startswith("VmData:"))
        ctx.save({"rlimit_data": [soft, hard], "vm_data": vm_data})
        block = bytearray(b"x") * (1 << 30)
        return {"len": len(block)}

    @queue.task(max_attempts=1)
    def shm_hog(ctx, mb=600):
        # A shared mapping is not private data: RLIMIT_DATA does not see it, so only the
        # supervisor's RSS polling can stop this one.
        area = mmap.mmap(-1, mb << 20)
        for offset in range(0, mb << 20, mmap.PAGESIZE):
            area[offset] = 1
        time.sleep(30)
        return "survived"

    @queue.task(max_attempts=1)
    def spawns_hogs(ctx, mb=150):
        # The child stays small; two programs it starts hold the memory, each under the
        # rlimit they inherit, together over the job's limit. All of it is the job's.
        import subprocess, sys
        program = f"b = bytearray(b'x') * ({mb} << 20); import time; time.sleep(30)"
        programs = [subprocess.Popen([sys.executable, "-c", program]) for _ in range(2)]
        for p in programs:
            p.wait()
        return "survived"
"""


def test_one_gib_under_400m_limit_fails_that_job_only(tmp_path, db_path, serve):
    app = write_app(tmp_path, APP_MEMORY)
    server = serve("--app", app, "--memory-limit", "400M", *FAST)
    wait_for(server.registered)
    with litequeue.Queue(db_path) as q:
        warm = q.enqueue("ok")
        wait_for(lambda: state_of(db_path, warm) == "done")
        rss_before = server.rss_bytes()
        hog = q.enqueue("hog_1g")
        good = [q.enqueue("ok", {"n": i}) for i in range(4)]

    wait_for(lambda: state_of(db_path, hog) == "dead", timeout=15)
    wait_for(lambda: all(state_of(db_path, j) == "done" for j in good), timeout=10)
    job = get(db_path, hog)
    # Refused by the rlimit in the child (MemoryError), not killed by the supervisor's RSS
    # poll, whose error also starts "memory limit exceeded" and names 400 MiB.
    assert "memory limit exceeded: MemoryError under the 400 MiB limit" in job.error, job.error
    soft, _ = job.checkpoint["rlimit_data"]
    # The limit is the job's 400 MiB on top of what the child held when it was set.
    assert 400 * MiB <= soft <= job.checkpoint["vm_data"] + 400 * MiB, job.checkpoint
    assert server.alive()
    # The allocation happened in the child: the supervisor's own memory did not move.
    rss_after = server.rss_bytes()
    assert rss_after - rss_before < 16 * MiB, (rss_before, rss_after)
    assert server.terminate() == 0
    assert_no_children_left(server)


def test_rss_polling_kills_memory_the_rlimit_does_not_count(tmp_path, db_path, serve):
    app = write_app(tmp_path, APP_MEMORY)
    server = serve("--app", app, "--memory-limit", "400M", "--isolation", "rlimit", *FAST)
    wait_for(server.registered)
    with litequeue.Queue(db_path) as q:
        hog = q.enqueue("shm_hog", {"mb": 600})
        good = [q.enqueue("ok", {"n": i}) for i in range(3)]
    wait_for(lambda: state_of(db_path, hog) == "dead", timeout=15)
    wait_for(lambda: all(state_of(db_path, j) == "done" for j in good), timeout=10)
    error = get(db_path, hog).error
    assert error.startswith("memory limit exceeded"), error
    assert re.search(r"\d+ MiB > 400 MiB", error), error
    assert server.alive()
    assert server.terminate() == 0
    assert_no_children_left(server)


def test_memory_of_programs_a_task_starts_counts_against_its_limit(tmp_path, db_path, serve):
    app = write_app(tmp_path, APP_MEMORY)
    server = serve("--app", app, "--memory-limit", "200M", "--isolation", "rlimit", *FAST)
    wait_for(server.registered)
    with litequeue.Queue(db_path) as q:
        hog = q.enqueue("spawns_hogs", {"mb": 150})
    wait_for(lambda: state_of(db_path, hog) == "dead", timeout=20)
    error = get(db_path, hog).error
    assert re.search(r"memory limit exceeded: \d+ MiB > 200 MiB", error), error
    assert server.terminate() == 0
    assert_no_children_left(server)
    assert not processes_naming("bytearray(b'x') * (150 << 20)")


def test_task_past_its_timeout_is_killed_then_dead(tmp_path, db_path, serve):
    app = write_app(tmp_path, APP_BASICS)
    server = serve("--app", app, "--poll", "0.05", "--grace", "0.5")
    wait_for(server.registered)
    with litequeue.Queue(db_path) as q:
        slow = q.enqueue("sleepy")
        paced = q.enqueue("paced")
        good = [q.enqueue("ok", {"n": i}) for i in range(3)]
    started = time.monotonic()
    wait_for(lambda: state_of(db_path, slow) == "dead", timeout=20)
    elapsed = time.monotonic() - started
    job = get(db_path, slow)
    assert "timeout" in job.error
    assert job.attempts == 2 and runs_of(db_path, slow) == 2
    assert elapsed < 15                     # 2 x (1 s timeout + grace) + backoff: no 60 s sleep
    wait_for(lambda: state_of(db_path, paced) == "done", timeout=10)
    job = get(db_path, paced)
    # Its first attempt timed out; the retry went on from the checkpoint it had saved.
    assert job.attempts == 2
    assert 0 < job.result["started_from"] < 15 and job.result["i"] == 15
    assert any("timeout" in (e["reason"] or "") for e in events_of(db_path, paced))
    assert all(state_of(db_path, j) == "done" for j in good)
    assert server.alive()
    assert server.terminate() == 0
    assert_no_children_left(server)


def test_killed_job_takes_its_own_subprocesses_with_it(tmp_path, db_path, serve):
    """A task that runs a program (ffmpeg, a converter) and is killed for its timeout must
    not leave that program running, orphaned, holding memory."""
    pid_file = tmp_path / "grandchild.pid"
    app = write_app(tmp_path, f"""
        import subprocess

        @queue.task(timeout=1, max_attempts=1)
        def convert(ctx):
            program = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            with open({str(pid_file)!r}, "w") as f:
                f.write(str(program.pid))
            program.wait()
    """)
    server = serve("--app", app, "--poll", "0.05", "--grace", "0.5")
    wait_for(server.registered)
    with litequeue.Queue(db_path) as q:
        job_id = q.enqueue("convert", max_attempts=1, timeout=1)
    wait_for(lambda: pid_file.exists() and pid_file.read_text())
    grandchild = psutil.Process(int(pid_file.read_text()))
    try:
        wait_for(lambda: state_of(db_path, job_id) == "dead", timeout=10)
        assert "timeout" in get(db_path, job_id).error
        wait_for(lambda: is_gone(grandchild), timeout=3)
    finally:
        if not is_gone(grandchild):
            grandchild.kill()                 # the one process this test started, by pid
    assert server.terminate() == 0
    assert_no_children_left(server)


def test_thread_using_task_within_budget_succeeds(tmp_path, db_path):
    app = write_app(tmp_path, APP_BASICS)
    with litequeue.Queue(db_path) as q:
        job_id = q.enqueue("threads", {"count": 20, "mb": 4}, max_attempts=1)
    out = burst(db_path, app)                # the default 400M memory limit
    assert out.returncode == 0, out.stderr
    job = get(db_path, job_id)
    assert job.state == "done", job.error
    assert job.result == {"threads": 20, "mb": 80}


def test_every_other_way_a_child_ends_is_recorded(tmp_path, db_path):
    app = write_app(tmp_path, """
        @queue.task(max_attempts=1)
        def hard_exit(ctx, code):
            os._exit(code)

        @queue.task(max_attempts=1)
        def sys_exit(ctx):
            sys.exit(0)

        @queue.task(max_attempts=1)
        def odd_result(ctx):
            return object()

        @queue.task(max_attempts=1)
        def segfault(ctx):
            import ctypes
            ctypes.string_at(0)
    """)
    with litequeue.Queue(db_path) as q:
        exited = q.enqueue("hard_exit", {"code": 3}, max_attempts=1)
        quit_ = q.enqueue("sys_exit", max_attempts=1)
        odd = q.enqueue("odd_result", max_attempts=1)
        segv = q.enqueue("segfault", max_attempts=1)
    out = burst(db_path, app)
    assert out.returncode == 0, out.stderr
    errors = {job_id: (get(db_path, job_id).state, get(db_path, job_id).error)
              for job_id in (exited, quit_, odd, segv)}
    assert errors[exited] == ("dead", "child exited with code 3 without recording a result")
    assert errors[quit_] == ("dead", "child exited with code 0 without recording a result")
    assert errors[odd][0] == "dead" and "not JSON" in errors[odd][1]
    assert errors[segv] == ("dead", "killed by signal 11")


# --------------------------------------------------------------------------------------
# Crashes and shutdown lose nothing
# --------------------------------------------------------------------------------------

APP_CHECKPOINT = """
    @queue.task
    def steps(ctx, n=5, step_s=0.0):
        # Records where it started, so a test can see it resumed from its checkpoint.
        state = ctx.checkpoint or {"i": 0, "total": 0}
        started_from = state["i"]
        while state["i"] < n:
            time.sleep(step_s)
            state = {"i": state["i"] + 1, "total": state["total"] + state["i"] * state["i"]}
            ctx.save(state)
        return {"started_from": started_from, "i": state["i"], "total": state["total"]}

    @queue.task
    def forever(ctx):
        state = ctx.checkpoint or {"i": 0}
        while True:
            time.sleep(0.05)
            state = {"i": state["i"] + 1}
            ctx.save(state)

    @queue.task
    def stubborn(ctx):
        while True:                    # never reaches a checkpoint: must be killed
            time.sleep(0.05)
"""


def expected_total(n):
    return sum(i * i for i in range(n))


def test_kill_9_supervisor_loses_nothing_and_leaves_no_orphans(tmp_path, db_path, serve):
    app = write_app(tmp_path, APP_CHECKPOINT)
    with litequeue.Queue(db_path) as q:
        long_ids = [q.enqueue("steps", {"n": 20, "step_s": 0.05}) for _ in range(2)]
        short_ids = q.enqueue_many([("steps", {"n": 2}) for _ in range(50)])
    server = serve("--app", app, "--slots", "2", *FAST)

    def both_checkpointed():
        jobs = [get(db_path, j) for j in long_ids]
        return all(j.state == "running" and j.checkpoint and j.checkpoint["i"] >= 3
                   for j in jobs)

    wait_for(both_checkpointed, timeout=15)
    children = server.children()
    assert len(children) >= 2
    assert all(state_of(db_path, j) == "queued" for j in short_ids)   # 50 still wait

    server.proc.send_signal(signal.SIGKILL)
    server.wait()
    # The children die with the supervisor (PR_SET_PDEATHSIG), not at the next serve.
    wait_for(lambda: all(is_gone(p) for p in children), timeout=5)
    assert_no_children_left(server)
    assert processes_naming(db_path) == []

    interrupted = {j: get(db_path, j) for j in long_ids}
    assert all(job.state == "running" for job in interrupted.values())   # lease left behind
    saved_at = {j: job.checkpoint["i"] for j, job in interrupted.items()}
    assert all(0 < i < 20 for i in saved_at.values())

    out = burst(db_path, app, "--slots", "2")
    assert out.returncode == 0, out.stderr
    states = job_states(db_path)
    assert set(states.values()) == {"done"} and len(states) == 52
    for job_id in long_ids:
        result = get(db_path, job_id).result
        assert result == {"started_from": saved_at[job_id], "i": 20,
                          "total": expected_total(20)}, job_id
        assert get(db_path, job_id).recoveries == 1
    for job_id in short_ids:
        assert get(db_path, job_id).result == {"started_from": 0, "i": 2, "total": 1}
        assert runs_of(db_path, job_id) == 1
    assert integrity_ok(db_path)


def test_live_supervisor_recovers_a_dead_ones_job_within_seconds(tmp_path, db_path, serve):
    app = write_app(tmp_path, APP_CHECKPOINT)
    first = serve("--app", app, *FAST)
    wait_for(first.registered)
    with litequeue.Queue(db_path) as q:
        job_id = q.enqueue("steps", {"n": 20, "step_s": 0.05})
    wait_for(lambda: (get(db_path, job_id).checkpoint or {}).get("i", 0) >= 3, timeout=10)
    second = serve("--app", app, *FAST)
    wait_for(second.registered)
    children = first.children()
    assert children                                  # else the PDEATHSIG check below is empty

    first.proc.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = time.monotonic()
    wait_for(lambda: all(is_gone(p) for p in children), timeout=5)
    saved = get(db_path, job_id).checkpoint["i"]
    wait_for(lambda: state_of(db_path, job_id) == "done", timeout=15)
    assert time.monotonic() - killed_at < 8          # seconds, not the minutes of a lease
    job = get(db_path, job_id)
    assert job.result == {"started_from": saved, "i": 20, "total": expected_total(20)}
    assert job.recoveries == 1
    assert second.terminate() == 0
    assert_no_children_left(second)


def test_job_that_kills_its_supervisor_ends_dead_instead_of_looping(tmp_path, db_path):
    app = write_app(tmp_path, """
        import signal

        @queue.task(max_attempts=2)
        def parricide(ctx):
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(30)
    """)
    with litequeue.Queue(db_path) as q:
        job_id = q.enqueue("parricide", max_attempts=2)
    codes = []
    while state_of(db_path, job_id) not in litequeue.FINAL_STATES and len(codes) < 5:
        codes.append(burst(db_path, app).returncode)
    assert codes == [-signal.SIGKILL, -signal.SIGKILL, 0]   # crash recoveries are charged
    job = get(db_path, job_id)
    assert job.state == "dead" and "recovered" in job.error, job.error
    assert job.recoveries >= 1
    assert integrity_ok(db_path)


def test_sigterm_requeues_running_job_uncharged_and_next_serve_resumes(tmp_path, db_path, serve):
    app = write_app(tmp_path, APP_CHECKPOINT)
    grace_s = 3
    server = serve("--app", app, "--poll", "0.05", "--grace", grace_s)
    wait_for(server.registered)
    with litequeue.Queue(db_path) as q:
        job_id = q.enqueue("steps", {"n": 30, "step_s": 0.05})
    wait_for(lambda: (get(db_path, job_id).checkpoint or {}).get("i", 0) >= 3, timeout=10)
    children = server.children()
    assert children

    asked_at = time.monotonic()
    assert server.terminate(timeout=grace_s + 5) == 0
    assert time.monotonic() - asked_at < grace_s            # stopped at its next save
    assert_no_children_left(server)
    job = get(db_path, job_id)
    assert job.state == "queued"
    assert job.attempts == 0                                # shutdown is not charged
    assert 3 <= job.checkpoint["i"] < 30
    saved = job.checkpoint["i"]
    assert all(is_gone(p) for p in children)

    with litequeue.Queue(db_path) as q:
        reference = q.enqueue("steps", {"n": 30})          # the same job, uninterrupted
    out = burst(db_path, app)
    assert out.returncode == 0, out.stderr
    resumed, whole = get(db_path, job_id), get(db_path, reference)
    assert resumed.state == whole.state == "done"
    assert resumed.result["started_from"] == saved
    assert whole.result["started_from"] == 0
    assert {**resumed.result, "started_from": 0} == whole.result
    assert whole.result == {"started_from": 0, "i": 30, "total": expected_total(30)}
    assert resumed.attempts == 1
    assert integrity_ok(db_path)


@pytest.mark.parametrize("how", ["systemd-sigterm-to-all", "ctrl-c-to-group"])
def test_signal_to_the_whole_service_requeues_uncharged(tmp_path, db_path, how):
    """systemd's default `KillMode=control-group` sends SIGTERM to the supervisor and to
    every process of the service at once; Ctrl-C sends SIGINT to the terminal's whole
    process group. Either way this is a shutdown: the running job goes back to queued with
    its (last) checkpoint, not charged, and the next serve resumes it."""
    app = write_app(tmp_path, APP_CHECKPOINT)
    command = [sys.executable, os.path.join(os.path.dirname(litequeue.__file__), "litequeue.py"),
               "serve", "--db", db_path, "--app", app, "--poll", "0.05", "--grace", "3"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env={**os.environ, "LITEQUEUE_DB": db_path})
    try:
        with litequeue.Queue(db_path) as q:
            # max_attempts=1: a charged attempt would show as a dead job.
            job_id = q.enqueue("steps", {"n": 30, "step_s": 0.05}, max_attempts=1)
        wait_for(lambda: (get(db_path, job_id).checkpoint or {}).get("i", 0) >= 3, timeout=10)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children                              # else only the supervisor is signalled
        # Both get the signal at once; which one acts first is a race, and either way the
        # job is requeued uncharged (run_ending's table covers the child acting first).
        if how == "systemd-sigterm-to-all":
            for pid in [proc.pid, *(child.pid for child in children)]:
                os.kill(pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    wait_for(lambda: all(is_gone(p) for p in children), timeout=5)
    job = get(db_path, job_id)
    assert (job.state, job.attempts) == ("queued", 0), (job.state, job.attempts, job.error)
    saved = job.checkpoint["i"]
    assert saved >= 3

    out = burst(db_path, app)
    assert out.returncode == 0, out.stderr
    assert get(db_path, job_id).result == {"started_from": saved, "i": 30,
                                           "total": expected_total(30)}


def test_second_sigterm_stops_at_once_and_loses_nothing(tmp_path, db_path, serve):
    app = write_app(tmp_path, APP_CHECKPOINT)
    server = serve("--app", app, "--poll", "0.05", "--grace", "30")
    wait_for(server.registered)
    with litequeue.Queue(db_path) as q:
        job_id = q.enqueue("stubborn", max_attempts=1)
    wait_for(lambda: state_of(db_path, job_id) == "running" and server.children())
    server.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: any("asked to stop" in line for line in server.lines), timeout=5)
    asked_at = time.monotonic()
    assert server.terminate(timeout=10) == 0                # the second signal
    assert time.monotonic() - asked_at < 5                  # not the 30 s grace
    assert_no_children_left(server)
    job = get(db_path, job_id)
    assert (job.state, job.attempts) == ("queued", 0), (job.state, job.attempts, job.error)


# --------------------------------------------------------------------------------------
# Several supervisors, cancel, unserved tasks
# --------------------------------------------------------------------------------------

def test_two_supervisors_500_jobs_each_runs_exactly_once(tmp_path, db_path, serve):
    ran_log = tmp_path / "ran.log"
    app = write_app(tmp_path, f"""
        @queue.task
        def note(ctx):
            # O_APPEND: each short write lands whole, whichever process makes it.
            with open({str(ran_log)!r}, "a") as f:
                f.write(f"{{ctx.job_id}} {{os.getppid()}}\\n")
            return ctx.job_id
    """)
    # synchronous=NORMAL only to spare the test 1,000 fsyncs; claims are just as atomic.
    first = serve("--app", app, "--slots", "2", "--durability", "normal", *FAST)
    second = serve("--app", app, "--slots", "2", "--durability", "normal", *FAST)
    wait_for(lambda: first.registered() and second.registered())
    with litequeue.Queue(db_path) as q:
        ids = q.enqueue_many(["note"] * 500)

    def all_done():
        with litequeue.Queue(db_path) as q:
            return q.stats()["jobs"]["done"] == 500

    wait_for(all_done, timeout=40, interval=0.2)
    assert first.terminate() == 0 and second.terminate() == 0
    ran = [line.split() for line in ran_log.read_text().splitlines()]
    ran_ids = sorted(int(job_id) for job_id, _ in ran)
    assert ran_ids == sorted(ids)                             # each exactly once
    by_supervisor = {int(parent) for _, parent in ran}
    assert by_supervisor == {first.pid, second.pid}           # both took a share
    with litequeue.Queue(db_path) as q:
        jobs = q.jobs(limit=None)
        starts = [e["job_id"] for e in q.events(kind="job", limit=10_000)
                  if e["to_state"] == "running"]
    assert all(job.state == "done" and job.attempts == 1 for job in jobs)
    assert sorted(starts) == sorted(ids)
    assert integrity_ok(db_path)


def test_cancel_running_job_from_cli(tmp_path, db_path, serve):
    app = write_app(tmp_path, APP_CHECKPOINT)
    server = serve("--app", app, "--poll", "0.05", "--grace", "1")
    wait_for(server.registered)
    with litequeue.Queue(db_path) as q:
        polite = q.enqueue("forever")         # stops at its next checkpoint
        stubborn = q.enqueue("stubborn")      # never checkpoints: killed after the grace
        after = q.enqueue("steps", {"n": 2})
    wait_for(lambda: state_of(db_path, polite) == state_of(db_path, stubborn) == "running")

    for job_id in (polite, stubborn):
        out = run_cli("jobs", "cancel", job_id, db=db_path)
        assert out.returncode == 0, out.stderr
        assert "cancel requested" in out.stdout
    wait_for(lambda: state_of(db_path, polite) == "cancelled", timeout=5)
    wait_for(lambda: state_of(db_path, stubborn) == "cancelled", timeout=8)
    wait_for(lambda: state_of(db_path, after) == "done", timeout=5)
    for job_id in (polite, stubborn):
        job = get(db_path, job_id)
        assert job.finished_at is not None and job.owner is None
    assert server.alive()
    assert server.terminate() == 0
    assert_no_children_left(server)


def test_job_of_a_task_no_live_supervisor_serves_waits_unserved(tmp_path, db_path, serve):
    app = write_app(tmp_path, """
        @queue.task
        def alpha(ctx):
            return "a"
    """)
    server = serve("--app", app, *FAST)
    wait_for(server.registered)
    out = run_cli("enqueue", "beta", db=db_path)          # a name nobody registered
    assert out.returncode == 0
    assert "not in this file's catalogue" in out.stderr     # the cron-typo warning
    beta = int(out.stdout)
    with litequeue.Queue(db_path) as q:
        heartbeat = q.enqueue("heartbeat")      # built in: served alongside the app's tasks
        alpha = q.enqueue("alpha")
    # alpha came after beta in FIFO order: once alpha is done, beta was passed over.
    wait_for(lambda: state_of(db_path, alpha) == state_of(db_path, heartbeat) == "done")
    job = get(db_path, beta)
    assert (job.state, job.attempts) == ("queued", 0)

    status = run_cli("status", "--json", db=db_path)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["unserved"] == ["beta"]
    assert shown["jobs"]["queued"] == 1
    assert shown["heartbeat_age"] is not None
    text = run_cli("status", db=db_path)
    assert re.search(r"^unserved\s+beta\b", text.stdout, re.M), text.stdout

    # A burst run of the same app does not wait for it either, and leaves it queued.
    assert server.terminate() == 0
    out = burst(db_path, app)
    assert out.returncode == 0, out.stderr
    assert state_of(db_path, beta) == "queued"


# --------------------------------------------------------------------------------------
# serve --app, and the log
# --------------------------------------------------------------------------------------

def test_app_that_cannot_be_imported_is_bad_input(tmp_path, db_path):
    broken = write_app(tmp_path, """
        @queue.task
        def fine(ctx):
            return 1

        def broken(:
            pass
    """, name="broken_app.py")
    out = run_cli("serve", "--burst", "--app", broken, db=db_path)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert "SyntaxError" in out.stderr and "broken_app" in out.stderr
    assert not os.path.exists(db_path)                    # bad input changes nothing

    missing = run_cli("serve", "--burst", "--app", "no_such_module_xyz", db=db_path)
    assert missing.returncode == 2
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "Traceback" not in missing.stderr and "no_such_module_xyz" in missing.stderr


def test_app_as_dotted_module_from_another_cwd(tmp_path, db_path):
    project = tmp_path / "project"
    package = project / "myapp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    write_app(package, """
        @queue.task
        def greet(ctx, who):
            return f"hello {who}"
    """)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with litequeue.Queue(db_path) as q:
        job_id = q.enqueue("greet", {"who": "edge"})

    # From the project directory (as a systemd WorkingDirectory would be): the module name.
    out = run_cli("serve", "--burst", "--app", "myapp.tasks", *FAST, db=db_path, cwd=project,
                  env={"LITEQUEUE_DB": db_path})
    assert out.returncode == 0, out.stderr
    assert get(db_path, job_id).result == "hello edge"

    # From an unrelated directory, with the project on PYTHONPATH.
    with litequeue.Queue(db_path) as q:
        again = q.enqueue("greet", {"who": "cron"})
    out = run_cli("serve", "--burst", "--app", "myapp.tasks", *FAST, db=db_path, cwd=elsewhere,
                  env={"LITEQUEUE_DB": db_path, "PYTHONPATH": str(project)})
    assert out.returncode == 0, out.stderr
    assert get(db_path, again).result == "hello cron"


def test_log_has_one_line_per_job_start_and_end(tmp_path, db_path):
    app = write_app(tmp_path, APP_BASICS)
    with litequeue.Queue(db_path) as q:
        good = q.enqueue("ok", {"n": 1})
        bad = q.enqueue("boom", max_attempts=1)
        aborted = q.enqueue("abort", max_attempts=1)
    out = burst(db_path, app)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert "Traceback" not in out.stderr                  # the traceback is on the job, not here
    for job_id, outcome in ((good, "done"), (bad, "dead"), (aborted, "dead")):
        starts, ends = one_line_per_job(lines, job_id)
        assert len(starts) == 1, lines
        assert len(ends) == 1, lines
        assert outcome in ends[0], ends
    assert "ValueError: boom from the task" in one_line_per_job(lines, bad)[1][0]
    assert "killed by signal 6" in one_line_per_job(lines, aborted)[1][0]


def test_serve_started_as_a_script_keeps_its_pid_interpreter_options_and_paths(tmp_path, db_path):
    """`python litequeue.py serve` restarts itself from the module's cached bytecode (its
    compiled script would otherwise stay in its memory): same pid, the interpreter's options
    (here -X importtime) still apply, and the app and the file are found as before."""
    app = write_app(tmp_path, APP_BASICS)
    with litequeue.Queue(db_path) as q:
        job_id = q.enqueue("ok", {"n": 7})
    command = [sys.executable, "-X", "importtime", SCRIPT, "serve", "--burst", "--app", app,
               "--db", db_path]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "LITEQUEUE_DB": db_path})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "import time:" in err                          # the option reached the supervisor
    assert f"litequeue[{proc.pid}]" in err                # its log lines carry the same pid
    assert get(db_path, job_id).result == {"n": 7}


def test_sigterm_with_a_long_poll_still_gives_a_job_its_grace(tmp_path, db_path, serve):
    """--poll 30 (PSI wake-ups make a long poll a cheap choice): at SIGTERM, a job that
    saves every 1.5 s still gets to stop at its next checkpoint within --grace 6, instead of
    being killed at once because the kill was moved earlier by two polls."""
    server = serve("--poll", "30", "--grace", "6")
    wait_for(server.registered)
    with litequeue.Queue(db_path) as q:
        job_id = q.enqueue("chunked", {"chunks": 100, "chunk_s": 1.5})
        wait_for(lambda: (q.get(job_id).checkpoint or {}).get("i", 0) >= 1, timeout=15)
        saved = q.get(job_id).checkpoint["i"]
    assert server.terminate() == 0
    job = get(db_path, job_id)
    assert job.state == "queued" and job.attempts == 0
    assert job.checkpoint["i"] > saved                      # it saved once more, and stopped
    back = [e for e in events_of(db_path, job_id) if e["to_state"] == "queued"]
    assert "no checkpoint within the grace" not in back[-1]["reason"], back[-1]


def test_an_idle_supervisor_takes_no_write_lock_to_claim_nothing(queue, db_path):
    """A free slot and nothing due: after one claim that found nothing, the loop reads
    whether anything became due before it claims (a write transaction) again; a delayed
    job is still claimed once it is due, by time alone."""
    queue.task(lambda ctx: None, name="echo")
    sup = litequeue.Supervisor(queue, poll=0.01, isolation=litequeue.Isolation("rlimit", "test"))
    sup.register()
    claims = []
    record_runs = queue.record_runs

    def counting(owner, records, **kwargs):
        claims.extend(kwargs.get("claims") or [])
        return record_runs(owner, records, **kwargs)

    queue.record_runs = counting
    try:
        started = time.monotonic()
        while time.monotonic() - started < 0.5:         # ~50 polls
            sup.step()
            time.sleep(0.01)
        assert len(claims) <= 1, claims
        with litequeue.Queue(db_path) as producer:        # another process's write
            job_id = producer.enqueue("echo", delay=0.3)
        before = len(claims)
        deadline = time.monotonic() + 10
        while get(db_path, job_id).state == "queued" and time.monotonic() < deadline:
            sup.step()
            time.sleep(0.01)
        assert get(db_path, job_id).state != "queued"     # claimed once due
        assert len(claims) - before <= 3, claims         # the write, then when due
    finally:
        sup.abandon_children()
