"""Failure modes found in review, each shown for real: a stalled supervisor keeps its jobs,
a fork that hangs on a copied lock, a cancel that meets a failure, a refused fork, memory
inherited from the supervisor, a busy database, what a task leaves behind, huge numbers."""

import logging
import os
import signal
import subprocess
import threading
import time

import apsw
import psutil
import pytest

import litequeue
from conftest import run_cli, start_serve, wait_for, write_app

MiB = 1 << 20


def job(db, job_id):
    with litequeue.Queue(db) as q:
        return q.get(job_id)


def run_until(supervisor, predicate, timeout=30):
    """Run a supervisor here (it needs the main thread for its signals) until predicate()
    holds, checked from a thread that then stops it. A predicate that never holds (or
    raises) fails the test, here in the test's thread, once the supervisor has stopped."""
    outcome = []

    def stop_when_done():
        try:
            wait_for(predicate, timeout=timeout)
            outcome.append(None)
        except BaseException as exc:               # raised again below, where pytest sees it
            outcome.append(exc)
        finally:
            supervisor.stop(now_=True)
    watcher = threading.Thread(target=stop_when_done, daemon=True)
    watcher.start()
    supervisor.run()
    watcher.join()
    assert outcome, "the watcher ended without a verdict"
    if outcome[0] is not None:
        raise outcome[0]


def heartbeat_of(db, pid):
    """The last heartbeat of the supervisor with this pid, or None."""
    with litequeue.Queue(db) as q:
        return next((s["heartbeat_at"] for s in q.live_supervisors() if s["pid"] == pid), None)


def stop_outside_a_transaction(pid, db, tries=100):
    """SIGSTOP pid at a moment it holds no write lock on the file: stopped inside a commit,
    it would block every other writer (the other supervisor's heartbeats included), which is
    not what the test is about."""
    for _ in range(tries):
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED)
        conn = apsw.Connection(db)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return
        except apsw.BusyError:
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.01)
        finally:
            conn.close()
    raise AssertionError(f"pid {pid} held the write lock at each of {tries} stops")


def test_a_stalled_supervisor_keeps_its_job(tmp_path, db_path):
    """SIGSTOP longer than two heartbeats: the other supervisor on this host sees the pid alive
    and does not take the job (its child may still be running it)."""
    finish = tmp_path / "finish"
    app = write_app(tmp_path, f"""
        @queue.task
        def slow(ctx):
            while not os.path.exists({str(finish)!r}):    # runs until the test lets it end
                time.sleep(0.05)
            return os.getpid()
    """)
    env = {"LITEQUEUE_DB": db_path}
    a = start_serve("--app", app, db=db_path, env=env)
    try:
        with litequeue.Queue(db_path) as q:
            job_id = q.enqueue("slow")
        wait_for(lambda: job(db_path, job_id).state == "running")
        b = start_serve("--app", app, db=db_path, env=env)
        try:
            wait_for(lambda: heartbeat_of(db_path, b.pid))
            stop_outside_a_transaction(a.pid, db_path)
            stale_at = heartbeat_of(db_path, a.pid) + 2 * litequeue.SUPERVISOR_HEARTBEAT_S
            # B runs its recovery pass right after each heartbeat: a heartbeat of B's once A
            # is two heartbeats stale, then B's next one, and a whole pass has looked at A.
            looked_at = wait_for(lambda: (beat := heartbeat_of(db_path, b.pid)) > stale_at
                                 and beat, timeout=15)
            wait_for(lambda: heartbeat_of(db_path, b.pid) > looked_at, timeout=10)
            stalled = job(db_path, job_id)
            assert (stalled.state, stalled.recoveries) == ("running", 0), stalled.error
            os.kill(a.pid, signal.SIGCONT)
            finish.touch()
            wait_for(lambda: job(db_path, job_id).state == "done", timeout=20)
            assert job(db_path, job_id).attempts == 1
        finally:
            b.terminate()
            b.wait(20)
    finally:
        os.kill(a.pid, signal.SIGCONT)
        a.terminate()
        a.wait(20)


def test_a_child_that_hangs_after_fork_is_killed_and_its_job_ends_visibly(db_path):
    """A task function that blocks before the task starts stands for a child stuck on a lock
    copied from a parent thread: the start deadline ends it, with the reason."""
    queue = litequeue.Queue(db_path)
    gate = threading.Lock()
    gate.acquire()                                 # held by this thread at fork, never freed

    @queue.task(max_attempts=1)
    def stuck(ctx):
        return "never"

    # The hang happens before the child reports it started: block in the child's own setup.
    original = litequeue.Context.__init__

    def blocked_init(self, *args, **kwargs):
        gate.acquire()                             # the forked copy of a held lock
        original(self, *args, **kwargs)

    litequeue.Context.__init__ = blocked_init
    try:
        job_id = stuck.enqueue()
        sup = litequeue.Supervisor(queue, start_deadline=1, poll=0.1, burst=True)
        sup.run()
    finally:
        litequeue.Context.__init__ = original
    finished = queue.get(job_id)
    assert finished.state == "dead"
    assert "did not start within 1s" in finished.error


def test_a_cancel_asked_while_running_wins_over_a_retry(queue):
    queue.enqueue("echo", max_attempts=3)
    claimed = queue.claim("w")[0]
    assert queue.cancel(claimed.id) == "running"
    assert queue.fail(claimed.id, "w", claimed.attempts, "boom") == "cancelled"
    assert queue.get(claimed.id).state == "cancelled"


def test_a_cancel_asked_before_a_recovery_ends_cancelled(queue):
    queue.enqueue("echo")
    claimed = queue.claim("gone-supervisor")[0]
    queue.cancel(claimed.id)
    state = queue.requeue(claimed.id, "gone-supervisor", claimed.attempts, "recovered",
                          charge=True, recovered=True)
    assert state == "cancelled" == queue.get(claimed.id).state


def test_a_refused_fork_gives_the_jobs_back_uncharged(db_path):
    queue = litequeue.Queue(db_path)
    ids = [queue.enqueue("echo", {"i": i}) for i in range(2)]

    class NoFork:
        @staticmethod
        def Process(**kwargs):
            class Refused:
                def start(self):
                    raise BlockingIOError(11, "Resource temporarily unavailable")
            return Refused()

    sup = litequeue.Supervisor(queue, slots=2, tasks=litequeue.builtin_tasks(queue, demos=True))
    sup.pool.mp = NoFork                           # the fault, injected: fork says EAGAIN
    sup.step()                                     # claims both; the fork is refused
    sup.step()                                     # commits them given back
    for job_id in ids:
        job = queue.get(job_id)
        assert (job.state, job.attempts) == ("queued", 0)
        assert "could not start a child" in queue.events(job_id=job_id)[-1]["reason"]


def test_memory_the_app_holds_at_import_is_not_charged_to_a_job(tmp_path, db_path):
    app = write_app(tmp_path, """
        BALLAST = bytearray(b"x") * (250 << 20)     # the app's own memory, at import

        @queue.task(memory_limit="200M", max_attempts=1)
        def light(ctx):
            time.sleep(1)                           # several polls while it runs
            return len(BALLAST) >> 20
    """)
    with litequeue.Queue(db_path) as q:
        job_id = q.enqueue("light")
    result = run_cli("serve", "--burst", "--app", app, "--poll", "0.05", db=db_path,
                     env={"LITEQUEUE_DB": db_path}, timeout=60)
    assert result.returncode == 0, result.stderr
    finished = job(db_path, job_id)
    assert (finished.state, finished.result) == ("done", 250), finished.error


def test_a_database_busy_past_the_timeout_is_waited_out(db_path, caplog):
    """Another process holds the write lock for longer than the supervisor's busy timeout:
    the supervisor logs it, keeps running, and runs the job once the lock is gone."""
    caplog.set_level(logging.WARNING, logger="litequeue")
    queue = litequeue.Queue(db_path, busy_timeout=0.2)
    job_id = queue.enqueue("echo", {"after": "busy"}, delay=0.5)
    locked = threading.Event()

    def hold_the_lock():
        blocker = apsw.Connection(db_path)
        time.sleep(0.3)
        blocker.execute("BEGIN IMMEDIATE")
        locked.set()
        time.sleep(1.5)
        blocker.execute("COMMIT")
        blocker.close()
    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    sup = litequeue.Supervisor(queue, poll=0.1, tasks=litequeue.builtin_tasks(queue, demos=True))
    observer = litequeue.Queue(db_path)
    run_until(sup, lambda: locked.is_set() and observer.get(job_id).state == "done")
    holder.join()
    finished = observer.get(job_id)
    assert (finished.state, finished.result) == ("done", {"after": "busy"}), finished.error
    waited = [r.getMessage() for r in caplog.records if r.getMessage().endswith("trying again")]
    assert waited, "the busy timeout was never met"


def test_what_a_task_leaves_running_dies_with_its_job(tmp_path, db_path):
    app = write_app(tmp_path, """
        import subprocess, sys

        @queue.task
        def leaves_behind(ctx):
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            return child.pid
    """)
    with litequeue.Queue(db_path) as q:
        job_id = q.enqueue("leaves_behind")
    result = run_cli("serve", "--burst", "--app", app, db=db_path,
                     env={"LITEQUEUE_DB": db_path}, timeout=60)
    assert result.returncode == 0, result.stderr
    left = job(db_path, job_id).result
    wait_for(lambda: not psutil.pid_exists(left) or
             psutil.Process(left).status() == psutil.STATUS_ZOMBIE, timeout=5)


@pytest.mark.parametrize("args", [
    ["enqueue", "echo", "--max-attempts", "99999999999999999999999"],
    ["enqueue", "echo", "--memory-limit", "1e17T"],
    ["jobs", "list", "--limit", "99999999999999999999"],
    ["serve", "--memory-limit", "1e17T", "--burst"],
])
def test_huge_numbers_are_bad_input_not_tracebacks(db_path, args):
    litequeue.Queue(db_path).close()
    result = run_cli(*args, db=db_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("step_s", [3600.0, -3600.0], ids=["forward-hour", "backward-hour"])
def test_a_wall_clock_step_neither_times_out_jobs_nor_stalls_the_loop(db_path, monkeypatch,
                                                                      step_s):
    """An edge device without a real-time clock gets its time from NTP after boot: the wall
    clock jumps. Forward, a job with a 600 s timeout must not be taken for timed out;
    backward, the memory polls must go on (they time the preemption and the kills)."""
    queue = litequeue.Queue(db_path)

    @queue.task(timeout=600, max_attempts=1)
    def steady(ctx):
        time.sleep(1.5)
        return "ok"

    class CountingProbe(litequeue.MemoryProbe):
        reads = 0

        def read(self, child_pids=()):
            CountingProbe.reads += 1
            return super().read(child_pids)

    job_id = steady.enqueue()
    real_time = time.time
    jump = threading.Timer(0.3, lambda: monkeypatch.setattr(
        litequeue, "now", lambda: real_time() + step_s))
    jump.start()
    litequeue.Supervisor(queue, poll=0.1, grace=0.5, burst=True, probe=CountingProbe()).run()
    jump.join()
    finished = queue.get(job_id)
    assert finished.state == "done", finished.error
    assert CountingProbe.reads >= 10                 # ~15 polls in 1.5 s at 0.1 s


def test_a_full_database_is_a_database_error_not_a_raw_apsw_one(db_path):
    queue = litequeue.Queue(db_path)
    queue.enqueue("echo")
    pages = queue.conn.execute("PRAGMA page_count").fetchall()[0][0]
    queue.conn.execute(f"PRAGMA max_page_count = {pages}")   # the disk is full, for this file
    with pytest.raises(litequeue.DatabaseUnusable, match="disk is full") as caught:
        queue.enqueue("echo", {"blob": "x" * 500_000})
    assert caught.value.exit_code == 4 and isinstance(caught.value.orig, apsw.FullError)
    assert [job.id for job in queue.jobs()] == [1]            # nothing half-written


def test_a_read_only_file_is_exit_4_with_one_line(tmp_path):
    db = tmp_path / "ro.db"
    litequeue.Queue(str(db)).close()
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this filesystem")   # root ignores chmod
    try:
        result = run_cli("enqueue", "echo", db=db)
    finally:
        subprocess.run(["chattr", "-i", str(db)])
    assert result.returncode == 4, result.stderr
    assert "read-only" in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_going_over_the_limit_during_a_grace_is_a_memory_failure(db_path):
    """A job asked to stop (preempted) that goes over its memory limit within the grace is
    killed for its memory: a failure, not the preemption it was asked for. For real: a
    child that allocates past its limit after a SIGUSR1 it ignores."""
    queue = litequeue.Queue(db_path)

    @queue.task(max_attempts=1, memory_limit="100M")
    def grows_when_asked(ctx, flag):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        ctx.save({"saved": True})
        while not os.path.exists(flag):
            time.sleep(0.01)
        # MAP_SHARED memory: outside RLIMIT_DATA, so only the supervisor's poll sees it.
        import mmap
        block = mmap.mmap(-1, 300 * MiB, flags=mmap.MAP_SHARED)
        for offset in range(0, 300 * MiB, 4096):
            block[offset] = 1
        time.sleep(30)

    flag = os.path.join(os.path.dirname(db_path), "flag")
    job_id = queue.enqueue("grows_when_asked", {"flag": flag})
    sup = litequeue.Supervisor(queue, poll=0.05, grace=20, burst=True)
    sup.pool.spec.prctl = None
    sup.register()
    try:
        wait_for(lambda: sup.step() and queue.get(job_id).checkpoint == {"saved": True})
        (run,) = sup._live_runs()
        sup._ask_stop(run, litequeue.STOP_PREEMPT, "preempted", time.monotonic(), None)
        open(flag, "w").close()
        wait_for(lambda: sup.step() and queue.get(job_id).state != "running", timeout=20)
    finally:
        sup.stop(now_=True)
        sup.abandon_children()
    job = queue.get(job_id)
    assert job.state == "dead" and job.error.startswith("memory limit exceeded"), job.error


def _claim_steps(queue, **claim_args):
    """SQLite virtual-machine steps one claim takes (a measure of work, not of time)."""
    steps = [0]

    def count():
        steps[0] += 1
        return 0                                   # 0: carry on
    queue.conn.set_progress_handler(count, 1)
    try:
        claimed = queue.claim("w", **claim_args)
    finally:
        queue.conn.set_progress_handler(None)
    return claimed, steps[0]


@pytest.mark.parametrize("why", ["served elsewhere", "breaker open"])
def test_a_backlog_of_jobs_this_claimer_may_not_run_does_not_slow_its_claims(db_path, why):
    """Several supervisors with different --app share a file; one task's backlog sits at the
    front of the queue. Claiming another task's job must not scan that backlog."""
    queue = litequeue.Queue(db_path, durable=False)
    claim_args = {"tasks": ["mine", "backlog"]} if why == "breaker open" else {"tasks": ["mine"]}
    if why == "breaker open":
        for _ in range(3):
            queue.enqueue("backlog")
            job = queue.claim("w", tasks=["backlog"])[0]
            queue.fail(job.id, "w", job.attempts, "boom")
    steps = {}
    for backlog in (200, 20_000):
        queue.enqueue_many([("backlog", {"i": i}) for i in range(backlog)])
        mine = queue.enqueue("mine")
        claimed, steps[backlog] = _claim_steps(queue, **claim_args)
        assert [job.id for job in claimed] == [mine]
    assert steps[20_000] < 2 * steps[200] + 500, steps       # a scan would be ~100x


def test_claim_order_across_tasks_is_kept_when_seeking_per_task(db_path):
    queue = litequeue.Queue(db_path, durable=False)
    queue.enqueue_many([("other", {"i": i}) for i in range(100)])     # fills the window
    late = queue.enqueue("b", delay=0)
    early_ids = [queue.enqueue("a"), queue.enqueue("b")]
    order = [job.id for job in queue.claim("w", tasks=["a", "b"], limit=3)]
    assert order == [late, *early_ids]
