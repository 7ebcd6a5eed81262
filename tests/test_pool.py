"""Pooled children (`serve --jobs-per-child N`, issue 6): a child runs up to N jobs of its
slot before it is replaced, and is replaced early when a job failed in it or its RSS grew
past CHILD_GROWTH_LIMIT_BYTES. The memory limit, the preemption and the crash accounting
stay per job. Real `python litequeue.py serve` runs, real children, real rlimits and memory;
each test puts the job under test on a child that has already run one (a warm job first)."""

import os
import resource
import signal
import time

import psutil
import pytest

import litequeue
from conftest import integrity_ok, run_cli, wait_for, write_app
from test_supervisor import (FAST, assert_no_children_left, burst, get, is_gone, serve,  # noqa: F401
                             state_of)

MiB = 1 << 20

APP_POOL = f"""
    import mmap, resource

    LEAKED = []

    @queue.task
    def whoami(ctx, n=0):
        soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        return {{"pid": os.getpid(), "n": n, "soft": soft, "hard": hard}}

    @queue.task(max_attempts=1)
    def boom(ctx):
        raise ValueError("boom")

    @queue.task(max_attempts=1)
    def hard_exit(ctx, code=3):
        os._exit(code)

    @queue.task(max_attempts=1)
    def leak(ctx, mb):
        LEAKED.append(bytearray(b"l") * (mb << 20))     # kept after the job: the child grew
        return os.getpid()

    @queue.task(max_attempts=1, memory_limit="64M")
    def hog(ctx, mb, pid_file):
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
        block = bytearray(b"x") * (mb << 20)
        return len(block)

    @queue.task(max_attempts=1, memory_limit="64M")
    def shm_hog(ctx, mb, pid_file):
        # Shared memory is not private data: only the supervisor's RSS polling sees it.
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
        area = mmap.mmap(-1, mb << 20)
        for offset in range(0, mb << 20, mmap.PAGESIZE):
            area[offset] = 1
        time.sleep(30)

    @queue.task
    def steps(ctx, n=30, step_s=0.05):
        state = ctx.checkpoint or {{"i": 0, "pids": []}}
        state["pids"] = sorted(set(state["pids"]) | {{os.getpid()}})
        while state["i"] < n:
            time.sleep(step_s)
            state = {{"i": state["i"] + 1, "pids": state["pids"]}}
            ctx.save(state)
        return state
"""


def result_pid(db, job_id):
    job = get(db, job_id)
    assert job.state == "done", (job.state, job.error)
    return job.result["pid"] if isinstance(job.result, dict) else job.result


def in_order(db, *jobs):
    """Enqueue (task, payload) pairs in order; with --slots 1 they run in this order. The
    file's task catalogue is written by the first serve, so the limits that the app declares
    are given here too."""
    with litequeue.Queue(db) as q:
        return [q.enqueue(task, payload, **OPTIONS.get(task, {})) for task, payload in jobs]


OPTIONS = {"boom": {"max_attempts": 1}, "hard_exit": {"max_attempts": 1},
           "leak": {"max_attempts": 1}, "hog": {"max_attempts": 1, "memory_limit": "64M"},
           "shm_hog": {"max_attempts": 1, "memory_limit": "64M"}}


def test_children_are_reused_up_to_jobs_per_child(tmp_path, db_path):
    app = write_app(tmp_path, APP_POOL)
    with litequeue.Queue(db_path) as q:
        ids = q.enqueue_many([("whoami", {"n": i}) for i in range(30)])
    out = burst(db_path, app, "--slots", "2", "--jobs-per-child", "10")
    assert out.returncode == 0, out.stderr
    pids = [result_pid(db_path, i) for i in ids]
    uses = {pid: pids.count(pid) for pid in set(pids)}
    assert max(uses.values()) <= 10, uses
    assert 3 <= len(uses) < 30, uses              # reused, and replaced after 10 jobs


def test_default_is_a_fresh_child_per_job_with_a_hard_limit(tmp_path, db_path):
    app = write_app(tmp_path, APP_POOL)
    with litequeue.Queue(db_path) as q:
        ids = q.enqueue_many([("whoami", {"n": i}) for i in range(6)])
    out = burst(db_path, app, "--slots", "2")
    assert out.returncode == 0, out.stderr
    results = [get(db_path, i).result for i in ids]
    assert len({r["pid"] for r in results}) == 6
    assert all(r["soft"] == r["hard"] != resource.RLIM_INFINITY for r in results)


def test_a_reused_child_sets_each_jobs_limit_as_a_soft_rlimit(tmp_path, db_path):
    app = write_app(tmp_path, APP_POOL)
    ids = in_order(db_path, ("whoami", {"n": 0}), ("whoami", {"n": 1}))
    out = burst(db_path, app, "--slots", "1", "--jobs-per-child", "5", "--memory-limit", "300M")
    assert out.returncode == 0, out.stderr
    first, second = (get(db_path, i).result for i in ids)
    assert first["pid"] == second["pid"]
    for limits in (first, second):
        # Soft: the child can set it again for its next job. About what the child held
        # (tens of MiB) plus the job's 300 MiB.
        assert limits["hard"] == resource.RLIM_INFINITY
        assert 300 * MiB < limits["soft"] < 600 * MiB, limits


def test_a_failed_job_replaces_its_child(tmp_path, db_path):
    app = write_app(tmp_path, APP_POOL)
    ids = in_order(db_path, ("whoami", {"n": 0}), ("whoami", {"n": 1}), ("boom", None),
                   ("whoami", {"n": 2}))
    out = burst(db_path, app, "--slots", "1", "--jobs-per-child", "10")
    assert out.returncode == 0, out.stderr
    assert get(db_path, ids[2]).state == "dead"
    assert "ValueError: boom" in get(db_path, ids[2]).error
    before_a, before_b, after = (result_pid(db_path, i) for i in (ids[0], ids[1], ids[3]))
    assert before_a == before_b != after


@pytest.mark.parametrize("mb, replaced", [(1, False), (48, True)])
def test_a_child_that_grew_past_the_threshold_is_replaced(tmp_path, db_path, mb, replaced):
    assert litequeue.CHILD_GROWTH_LIMIT_BYTES == 32 * MiB
    app = write_app(tmp_path, APP_POOL)
    leak_id, after_id = in_order(db_path, ("leak", {"mb": mb}), ("whoami", {}))
    out = burst(db_path, app, "--slots", "1", "--jobs-per-child", "10")
    assert out.returncode == 0, out.stderr
    assert (result_pid(db_path, leak_id) != result_pid(db_path, after_id)) == replaced


def test_memory_limit_still_applies_per_job_in_a_reused_child(tmp_path, db_path):
    app = write_app(tmp_path, APP_POOL)
    pid_file = tmp_path / "hog.pid"
    warm, hog, after = in_order(db_path, ("whoami", {}),
                                ("hog", {"mb": 200, "pid_file": str(pid_file)}), ("whoami", {}))
    out = burst(db_path, app, "--slots", "1", "--jobs-per-child", "10")
    assert out.returncode == 0, out.stderr
    assert int(pid_file.read_text()) == result_pid(db_path, warm)    # it ran in a reused child
    job = get(db_path, hog)
    assert job.state == "dead"
    assert "memory limit exceeded: MemoryError under the 64 MiB limit" in job.error
    assert result_pid(db_path, after) != result_pid(db_path, warm)   # a failure: replaced


def test_rss_polling_measures_a_reused_childs_job_from_its_hand_over(tmp_path, db_path, serve):
    """The warm job leaves the child 40 MiB bigger (under the growth threshold, so it is
    reused). The shared-memory job then holds 100 MiB: its own memory is measured from the
    hand-over, and its 64 MiB limit is enforced by RSS polling, the rlimit being blind to it."""
    app = write_app(tmp_path, APP_POOL)
    pid_file = tmp_path / "shm.pid"
    server = serve("--app", app, "--slots", "1", "--jobs-per-child", "10", "--isolation",
                   "rlimit", *FAST)
    (warm,) = in_order(db_path, ("leak", {"mb": 30}))
    wait_for(lambda: state_of(db_path, warm) == "done")
    (hog,) = in_order(db_path, ("shm_hog", {"mb": 100, "pid_file": str(pid_file)}))
    wait_for(lambda: state_of(db_path, hog) == "dead", timeout=20)
    assert int(pid_file.read_text()) == result_pid(db_path, warm)
    error = get(db_path, hog).error
    assert error.startswith("memory limit exceeded: ") and error.endswith(" > 64 MiB"), error
    own_mib = int(error.split(": ")[1].split(" MiB")[0])
    assert 64 < own_mib < 130, error          # the job's 100 MiB, not the warm job's 30 more
    assert server.alive()
    assert server.terminate() == 0
    assert_no_children_left(server)


def test_a_crash_in_a_reused_child_is_charged_to_that_job_only(tmp_path, db_path):
    app = write_app(tmp_path, APP_POOL)
    warm, crash, after = in_order(db_path, ("whoami", {}), ("hard_exit", {"code": 3}),
                                  ("whoami", {}))
    out = burst(db_path, app, "--slots", "1", "--jobs-per-child", "10")
    assert out.returncode == 0, out.stderr
    job = get(db_path, crash)
    assert (job.state, job.attempts) == ("dead", 1)
    assert job.error == "child exited with code 3 without recording a result"
    assert get(db_path, warm).attempts == get(db_path, after).attempts == 1
    assert result_pid(db_path, after) != result_pid(db_path, warm)


def test_sigterm_stops_a_reused_childs_job_at_a_checkpoint_and_idle_children_go(
        tmp_path, db_path, serve):
    app = write_app(tmp_path, APP_POOL)
    server = serve("--app", app, "--slots", "2", "--jobs-per-child", "10", *FAST)
    warm = in_order(db_path, ("whoami", {"n": 0}), ("whoami", {"n": 1}))
    wait_for(lambda: all(state_of(db_path, i) == "done" for i in warm))
    warm_pids = {result_pid(db_path, i) for i in warm}
    (long_job,) = in_order(db_path, ("steps", {"n": 200, "step_s": 0.05}))
    wait_for(lambda: (get(db_path, long_job).checkpoint or {}).get("i", 0) >= 3, timeout=10)
    running_in = get(db_path, long_job).checkpoint["pids"]
    assert set(running_in) <= warm_pids                  # the long job got a reused child
    assert server.terminate(timeout=10) == 0
    job = get(db_path, long_job)
    assert (job.state, job.attempts) == ("queued", 0)    # a shutdown is not charged
    assert 3 <= job.checkpoint["i"] < 200
    assert_no_children_left(server)                     # the idle child went too
    assert all(not psutil.pid_exists(pid) or is_gone(psutil.Process(pid)) for pid in warm_pids)
    assert integrity_ok(db_path)


def test_cancel_of_a_job_in_a_reused_child(tmp_path, db_path, serve):
    app = write_app(tmp_path, APP_POOL)
    server = serve("--app", app, "--slots", "1", "--jobs-per-child", "10", *FAST)
    (warm,) = in_order(db_path, ("whoami", {}))
    wait_for(lambda: state_of(db_path, warm) == "done")
    (long_job,) = in_order(db_path, ("steps", {"n": 400, "step_s": 0.05}))
    wait_for(lambda: (get(db_path, long_job).checkpoint or {}).get("i", 0) >= 2, timeout=10)
    assert get(db_path, long_job).checkpoint["pids"] == [result_pid(db_path, warm)]
    out = run_cli("jobs", "cancel", long_job, db=db_path)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: state_of(db_path, long_job) == "cancelled", timeout=10)
    (after,) = in_order(db_path, ("whoami", {}))
    wait_for(lambda: state_of(db_path, after) == "done", timeout=10)
    assert result_pid(db_path, after) != result_pid(db_path, warm)
    assert server.terminate() == 0
    assert_no_children_left(server)


def test_an_idle_child_killed_from_outside_loses_nothing(tmp_path, db_path, serve):
    app = write_app(tmp_path, APP_POOL)
    server = serve("--app", app, "--slots", "1", "--jobs-per-child", "10", *FAST)
    (warm,) = in_order(db_path, ("whoami", {}))
    wait_for(lambda: state_of(db_path, warm) == "done")
    idle = psutil.Process(result_pid(db_path, warm))
    idle.send_signal(signal.SIGKILL)                     # the OOM killer, or an operator
    wait_for(lambda: is_gone(idle), timeout=5)
    ids = in_order(db_path, *[("whoami", {"n": i}) for i in range(5)])
    wait_for(lambda: all(state_of(db_path, i) == "done" for i in ids), timeout=15)
    assert all(get(db_path, i).attempts == 1 for i in ids)
    assert server.alive()
    assert server.terminate() == 0
    assert_no_children_left(server)


def test_idle_children_are_let_go_when_memory_is_tight(queue):
    """Injected pressure, real children: once the warm job is done, pressure goes to the
    skip level while a long job keeps the supervisor busy: the idle child is let go at once
    (it holds memory and has nothing to do), the running job is not touched."""
    from test_memory import ScriptedProbe

    @queue.task(priority="critical")
    def warm(ctx):
        return os.getpid()

    tasks = litequeue.builtin_tasks(queue, demos=True)
    tasks["warm"] = queue.registry["warm"]
    warm_id = queue.enqueue("warm")
    long_id = queue.enqueue("sleep", {"seconds": 2.0}, priority="critical")
    reader = litequeue.Queue(queue.path)
    seen = {}
    deadline = time.monotonic() + 20

    def pressure():
        if time.monotonic() > deadline:
            sup.stop(now_=True)
        if reader.get(warm_id).state != "done":
            return 10.0
        pid = seen.setdefault("pid", reader.get(warm_id).result)
        if "gone_while" not in seen and is_gone_pid(pid):
            seen["gone_while"] = reader.get(long_id).state
        return 75.0

    sup = litequeue.Supervisor(queue, slots=2, probe=ScriptedProbe(pressure), poll=0.05,
                               hold=0.2, burst=True, tasks=tasks, jobs_per_child=10)
    try:
        assert sup.run() == 0
    finally:
        reader.close()
    assert time.monotonic() < deadline, "the supervisor had to be stopped"
    assert seen.get("gone_while") == "running"
    assert queue.get(long_id).state == "done"


def is_gone_pid(pid):
    try:
        return is_gone(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("value", ["0", "-3", "many", "1e9"])
def test_bad_jobs_per_child_is_bad_input(db_path, value):
    out = run_cli("serve", "--jobs-per-child", value, "--burst", db=db_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "jobs-per-child" in out.stderr or "jobs_per_child" in out.stderr


def test_pooled_children_claim_only_what_the_memory_level_lets_start(queue):
    """Pooled children claim their next job themselves, but only at the priorities the
    supervisor publishes for its memory level. Injected pressure at the skip level: the
    low job waits, though a reused child is free; pressure falls and it runs."""
    from test_memory import ScriptedProbe

    @queue.task
    def stamp(ctx):
        return {"pid": os.getpid(), "at": time.time()}

    tasks = {"stamp": queue.registry["stamp"]}
    normal = [queue.enqueue("stamp") for _ in range(3)]
    low = queue.enqueue("stamp", priority="low")
    reader = litequeue.Queue(queue.path)
    seen = {}
    deadline = time.monotonic() + 20

    def pressure():
        if time.monotonic() > deadline:
            sup.stop(now_=True)
        if not all(reader.get(i).state == "done" for i in normal):
            return 75.0                              # skip: no low job may start
        seen.setdefault("normal_done_at", time.monotonic())
        if time.monotonic() - seen["normal_done_at"] < 0.5:
            seen["low_state_while_skip"] = reader.get(low).state
            return 75.0
        seen.setdefault("released_at", time.time())
        return 10.0

    sup = litequeue.Supervisor(queue, slots=1, probe=ScriptedProbe(pressure), poll=0.05,
                               hold=0.1, margin=5, burst=True, tasks=tasks, jobs_per_child=10)
    try:
        assert sup.run() == 0
    finally:
        reader.close()
    assert time.monotonic() < deadline, "the supervisor had to be stopped"
    pids = {queue.get(i).result["pid"] for i in normal}
    assert len(pids) == 1                            # one child ran them, claiming them itself
    assert seen["low_state_while_skip"] == "queued"
    job = queue.get(low)
    assert job.state == "done" and job.result["at"] >= seen["released_at"]


# --------------------------------------------------------------------------------------
# Races found in review, replayed with the supervisor stepped by hand (real children)
# --------------------------------------------------------------------------------------

class FixedProbe:
    def __init__(self, pressure=10.0):
        self.pressure = pressure

    def machine_percent(self):
        return self.pressure

    def read(self, child_pids=()):
        return litequeue.MemoryReading(self.pressure, self.pressure)


def stepped_supervisor(queue, **options):
    """A Supervisor set up as run() sets it up, for a test to call step() at chosen moments."""
    import ctypes
    sup = litequeue.Supervisor(queue, tasks=dict(queue.registry), **options)
    libc = ctypes.CDLL(None, use_errno=True)
    sup.pool.spec.prctl = getattr(libc, "prctl", None)
    sup.register()
    return sup


def step_for(sup, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sup.step()
        time.sleep(0.02)


def step_until(sup, predicate, timeout=20):
    """Step the supervisor until predicate() holds (children wait for it to commit)."""
    return wait_for(lambda: sup.step() and predicate(), timeout=timeout)


def finish(sup):
    sup.stop(now_=True)
    for _ in range(500):
        sup.step()
        if sup._finished:
            break
        time.sleep(0.02)
    sup.abandon_children()


def test_a_crash_after_many_reports_is_charged_to_the_job_that_crashed(queue):
    """A pooled child runs 150 short jobs, handed to it ahead of time, then crashes on one:
    every report in its pipe is read before it is settled, so the crash is the crashing
    job's (charged, dead), and the jobs handed to it after that one go back uncharged."""
    @queue.task(max_attempts=5)
    def noop(ctx):
        return None

    @queue.task(max_attempts=1)
    def crash(ctx):
        os.kill(os.getpid(), signal.SIGSEGV)

    ids = queue.enqueue_many(["noop"] * 150)
    bad = queue.enqueue("crash")
    after = queue.enqueue_many(["noop"] * 5)
    sup = stepped_supervisor(queue, slots=1, jobs_per_child=1000, probe=FixedProbe())
    try:
        step_until(sup, lambda: all(queue.get(i).state == "done" for i in [*ids, *after]))
        job = queue.get(bad)
        assert (job.state, job.attempts, job.error) == ("dead", 1, "killed by signal 11")
        started = [e for e in queue.events(job_id=bad) if e["to_state"] == "running"]
        assert len(started) == 1                      # it ran once: max_attempts=1
        given_back = [e for i in after for e in queue.events(job_id=i)
                      if e["from_state"] == "running" and e["to_state"] == "queued"]
        assert all("attempt" not in e["reason"] for e in given_back)
        assert all(queue.get(i).attempts == 1 for i in after)    # never charged twice
    finally:
        finish(sup)


def test_jobs_handed_ahead_to_a_child_that_is_killed_go_back_uncharged(queue, tmp_path):
    """Short jobs make the supervisor hand a pooled child its next jobs ahead of time. A job
    of a task known to be short then turns out long, and its child is killed from outside:
    that job is charged (it failed), the jobs waiting behind it in the child are given back
    with no attempt spent."""
    flag = tmp_path / "go"

    @queue.task(max_attempts=3)
    def quick(ctx):
        return None

    @queue.task(max_attempts=3)
    def usually_quick(ctx, block=False):
        if block:
            ctx.save({"in": True})
            while not flag.exists():
                time.sleep(0.01)

    warm = queue.enqueue_many(["quick"] * 3 + [("usually_quick", {"block": False})])
    slow_id = queue.enqueue("usually_quick", {"block": True})
    behind = queue.enqueue_many(["quick"] * 3)
    sup = stepped_supervisor(queue, slots=1, jobs_per_child=100, probe=FixedProbe())
    try:
        step_until(sup, lambda: queue.get(slow_id).checkpoint == {"in": True}
                   and len(sup.pool.children[0].runs) > 1)
        (child,) = sup.pool.children
        held = [run.job.id for run in child.runs[1:]]
        assert set(held) <= set(behind)              # handed ahead, not started
        os.kill(child.pid, signal.SIGKILL)
        step_until(sup, lambda: queue.get(slow_id).error == "killed by signal 9")
        flag.touch()
        step_until(sup, lambda: all(queue.get(i).state == "done" for i in behind))
        for job_id in held:
            back = [e for e in queue.events(job_id=job_id)
                    if (e["from_state"], e["to_state"]) == ("running", "queued")]
            assert [e["reason"] for e in back] == ["handed back before it started"]
            assert queue.get(job_id).attempts == 1        # the attempt it ran; none for that
        assert all(queue.get(i).state == "done" for i in warm)
    finally:
        flag.touch()
        finish(sup)


def test_no_job_is_handed_ahead_behind_a_job_of_a_task_not_known_to_be_short(queue, tmp_path):
    """A pooled child runs short jobs, then one of a task never seen here: the jobs after it
    wait in the supervisor (held), not in that child, and start in order once it is done."""
    flag = tmp_path / "go"

    @queue.task
    def quick(ctx):
        return os.getpid()

    @queue.task
    def unknown(ctx):
        ctx.save({"in": True})
        while not flag.exists():
            time.sleep(0.01)

    queue.enqueue_many(["quick"] * 3)
    long_id = queue.enqueue("unknown")
    after = queue.enqueue_many(["quick"] * 3)
    sup = stepped_supervisor(queue, slots=1, jobs_per_child=100, probe=FixedProbe())
    try:
        step_until(sup, lambda: queue.get(long_id).checkpoint == {"in": True})
        step_for(sup, 0.6)                            # two polls: claims were looked at
        (child,) = sup.pool.children
        assert [run.job.id for run in child.runs] == [long_id]
        flag.touch()
        step_until(sup, lambda: all(queue.get(i).state == "done" for i in after))
        started = [queue.get(i).started_at for i in after]
        assert started == sorted(started)
    finally:
        flag.touch()
        finish(sup)


@pytest.mark.parametrize("jobs_per_child", [1, 4])
def test_a_cancel_seen_between_polls_is_still_applied(queue, jobs_per_child):
    """Every slot busy; the cancel is written, then a step that is not a memory poll sees
    the write: the cancel is applied at the next poll, not lost."""
    @queue.task(max_attempts=3)
    def longrun(ctx):
        time.sleep(3.0)                # never saves: only the grace kill stops it
        return "finished"

    job_id = queue.enqueue("longrun")
    sup = stepped_supervisor(queue, slots=1, jobs_per_child=jobs_per_child,
                             probe=FixedProbe(), grace=0.5)
    try:
        t0 = time.monotonic()
        sup.step(tick=t0)                         # a poll: starts the job
        wait_for(lambda: queue.get(job_id).state == "running")
        with litequeue.Queue(queue.path) as other:
            other.cancel(job_id)
        sup.step(tick=t0 + 0.05)                  # not a poll: the write is seen here
        tick = t0 + 0.3
        deadline = time.monotonic() + 2.5
        while queue.get(job_id).state == "running" and time.monotonic() < deadline:
            sup.step(tick=max(tick, time.monotonic()))
            tick += 0.25
            time.sleep(0.05)
        job = queue.get(job_id)
        assert (job.state, job.result) == ("cancelled", None)
    finally:
        finish(sup)


def test_a_level_change_reaches_pooled_children_in_the_same_poll(queue):
    """Pressure rises to the preempt level while a pooled child runs a high job: the
    priorities claimed change in that very poll, so the child does not go on to the normal
    job waiting behind it."""
    @queue.task(max_attempts=3, priority="high")
    def warm(ctx):
        time.sleep(0.4)

    @queue.task(max_attempts=1)
    def plain(ctx):
        return "ran"

    queue.enqueue("warm")
    plain_id = queue.enqueue("plain")
    probe = FixedProbe(10.0)
    sup = stepped_supervisor(queue, slots=1, jobs_per_child=5, probe=probe, grace=0.5,
                             poll=0.25)
    try:
        t0 = time.monotonic()
        sup.step(tick=t0)
        step_until(sup, lambda: sup._live_runs() and sup._live_runs()[0].started_tick)
        probe.pressure = 90.0
        sup.step(tick=t0 + 0.25)                   # a poll: level -> preempt
        assert sup.tracker.level == "preempt"
        step_until(sup, lambda: not sup._live_runs())          # the high job ended
        step_for(sup, 0.5)                         # and nothing else starts meanwhile
        job = queue.get(plain_id)
        assert (job.state, job.attempts) == ("queued", 0)
    finally:
        finish(sup)


def test_a_checkpoint_reported_before_an_emergency_kill_is_kept_and_uncharged(queue):
    """A pooled child's second job saves a checkpoint; the supervisor commits it (the child
    waits for that), then an emergency kills the child: the job saved in this run, so it
    goes back uncharged with its checkpoint."""
    @queue.task(max_attempts=3)
    def warm(ctx):
        return None

    @queue.task(max_attempts=1)
    def saver(ctx):
        ctx.save({"step": 1})
        time.sleep(10)

    queue.enqueue("warm")
    saver_id = queue.enqueue("saver")
    probe = FixedProbe(10.0)
    sup = stepped_supervisor(queue, slots=1, jobs_per_child=5, probe=probe, grace=1)
    try:
        step_until(sup, lambda: queue.get(saver_id).checkpoint == {"step": 1})
        probe.pressure = 97.0                      # emergency: killed at once
        step_until(sup, lambda: queue.get(saver_id).state != "running")
        job = queue.get(saver_id)
        assert (job.state, job.attempts, job.preemptions) == ("queued", 0, 1)
        assert job.checkpoint == {"step": 1}
    finally:
        finish(sup)
