"""`async def` tasks (issue 11): each runs in its child on a fresh event loop, and everything a
plain task has (checkpoints, progress, stop requests, preemption, timeouts, memory limits,
cancellation, SIGTERM) works the same. For real: a Supervisor forks a child per job."""

import asyncio
import os
import signal
import time

import litequeue
from conftest import wait_for


class ScriptedPressure:
    """Memory pressure the test computes: a function called at every poll."""

    def __init__(self, pressure):
        self.pressure = pressure
        self.budget_bytes = None

    def machine_percent(self):
        return self.pressure()

    def read(self, child_pids=()):
        value = self.pressure()
        return litequeue.MemoryReading(value, value)


def run_burst(queue, *, limit_s=20, pressure=lambda: 10.0, **options):
    """Serve until no job is due, as `serve --burst` would; stop at once after limit_s."""
    deadline = time.monotonic() + limit_s

    def guarded():
        if time.monotonic() > deadline:
            sup.stop(now_=True)
        return pressure()

    sup = litequeue.Supervisor(queue, tasks=dict(queue.registry), burst=True, poll=0.05,
                               probe=ScriptedPressure(guarded), **options)
    assert sup.run() == 0
    assert time.monotonic() < deadline, "the supervisor had to be stopped"


def test_an_async_task_runs_to_done_with_its_progress(queue):
    @queue.task
    async def add(ctx, a, b):
        await asyncio.sleep(0.01)
        ctx.progress(1, 1)
        return {"sum": a + b, "loop": type(asyncio.get_running_loop()).__name__}

    job_id = queue.enqueue("add", {"a": 2, "b": 3})
    run_burst(queue)
    job = queue.get(job_id)
    assert job.state == "done", job.error
    assert job.result["sum"] == 5 and job.result["loop"].endswith("EventLoop")
    assert (job.progress_done, job.progress_total) == (1.0, 1.0)


def test_an_async_task_preempted_at_save_resumes_from_its_checkpoint(queue):
    """Pressure rises once the task has saved three steps; the task sees ctx.stopping while
    it awaits, saves, and ctx.save's StopRequested ends it: requeued uncharged with its
    checkpoint, and it resumes from there to done."""
    @queue.task(max_attempts=1)
    async def steps(ctx, n=12, step_s=0.02):
        state = ctx.checkpoint or {"i": 0, "saw_stopping": False, "starts": []}
        state["starts"].append(state["i"])
        while state["i"] < n:
            await asyncio.sleep(step_s)
            state["i"] += 1
            if state["i"] == 3 and not state["saw_stopping"]:
                while not ctx.stopping:             # the preemption is coming: wait for it
                    await asyncio.sleep(0.01)
                state["saw_stopping"] = True
            ctx.progress(state["i"], n)
            ctx.save(state)
        return state

    job_id = queue.enqueue("steps")
    reader = litequeue.Queue(queue.path)

    def pressure():
        job = reader.get(job_id)
        saved = (job.checkpoint or {}).get("i", 0) >= 2
        return 90.0 if job.preemptions == 0 and job.state == "running" and saved else 10.0

    try:
        run_burst(queue, pressure=pressure, hold=0.1, grace=10)
    finally:
        reader.close()
    job = queue.get(job_id)
    assert job.state == "done", job.error
    assert job.preemptions == 1 and job.attempts == 1      # stopped after a save: not charged
    assert job.result["saw_stopping"] is True
    assert job.result["starts"] == [0, 3] and job.result["i"] == 12
    back = [e for e in queue.events(job_id=job_id, kind="job")
            if (e["from_state"], e["to_state"]) == ("running", "queued")]
    assert len(back) == 1 and "grace" not in (back[0]["reason"] or "")


def test_an_async_task_that_raises_fails_with_its_traceback(queue):
    @queue.task(max_attempts=1)
    async def breaks(ctx):
        await asyncio.sleep(0.01)
        raise ValueError("async boom")

    job_id = queue.enqueue("breaks")
    run_burst(queue)
    job = queue.get(job_id)
    assert job.state == "dead"
    assert "Traceback (most recent call last)" in job.error
    assert "in breaks" in job.error and job.error.endswith("ValueError: async boom")


def test_an_async_task_past_its_timeout_stops_at_its_next_save(queue):
    """The timeout's stop request reaches a task awaiting a sleep: it ends at its next
    ctx.save (not killed after the grace), failed "timeout after 1s", its checkpoint kept."""
    @queue.task(timeout=1, max_attempts=1)
    async def endless(ctx):
        state = {"i": 0}
        while True:
            await asyncio.sleep(0.05)
            state["i"] += 1
            ctx.save(state)

    job_id = queue.enqueue("endless")
    started = time.monotonic()
    run_burst(queue, grace=10)
    job = queue.get(job_id)
    assert (job.state, job.error) == ("dead", "timeout after 1s")
    assert job.checkpoint["i"] >= 5
    assert time.monotonic() - started < 8                  # not the 10 s grace


def test_an_async_task_that_never_saves_is_killed_after_the_grace(queue):
    @queue.task(timeout=0.5, max_attempts=1)
    async def sleeps(ctx):
        await asyncio.sleep(60)

    job_id = queue.enqueue("sleeps")
    run_burst(queue, grace=0.3)
    job = queue.get(job_id)
    assert job.state == "dead"
    assert job.error == "timeout after 0.5s: no checkpoint within the grace"


def test_an_async_task_allocating_past_its_memory_limit_fails_and_says_so(queue):
    @queue.task(max_attempts=1, memory_limit="64M")
    async def hog(ctx):
        await asyncio.sleep(0)
        held = bytearray(256 << 20)
        return len(held)

    job_id = queue.enqueue("hog")
    run_burst(queue)
    job = queue.get(job_id)
    assert job.state == "dead"
    assert job.error.startswith("memory limit exceeded"), job.error


def test_an_async_task_cancelled_while_running_ends_cancelled(queue):
    @queue.task(max_attempts=1)
    async def waits(ctx):
        state = {"i": 0}
        while True:
            await asyncio.sleep(0.02)
            state["i"] += 1
            ctx.save(state)

    job_id = queue.enqueue("waits")
    sup = litequeue.Supervisor(queue, tasks=dict(queue.registry), poll=0.05, grace=10)
    sup.register()
    try:
        wait_for(lambda: sup.step() and (queue.get(job_id).checkpoint or {}).get("i", 0) >= 2)
        with litequeue.Queue(queue.path) as other:
            other.cancel(job_id)
        wait_for(lambda: sup.step() and queue.get(job_id).state != "running", timeout=8)
    finally:
        sup.stop(now_=True)
        sup.abandon_children()
    assert queue.get(job_id).state == "cancelled"


def test_sigterm_from_outside_requeues_an_async_task_at_its_next_save(queue):
    """systemd's SIGTERM to the whole group reaches the child first: the job stops at its
    next ctx.save and waits in the queue with its checkpoint, uncharged."""
    @queue.task(max_attempts=1)
    async def waits(ctx):
        state = ctx.checkpoint or {"i": 0}
        while True:
            await asyncio.sleep(0.02)
            state["i"] += 1
            ctx.save(state)

    job_id = queue.enqueue("waits")
    sup = litequeue.Supervisor(queue, tasks=dict(queue.registry), poll=0.05, grace=10)
    sup.register()
    try:
        wait_for(lambda: sup.step() and (queue.get(job_id).checkpoint or {}).get("i", 0) >= 2)
        (run,) = sup._live_runs()
        os.kill(run.child.pid, signal.SIGTERM)
        sup.stop()                                  # as the supervisor's own SIGTERM would
        wait_for(lambda: sup.step() is not None and queue.get(job_id).state != "running",
                 timeout=8)
    finally:
        sup.stop(now_=True)
        sup.abandon_children()
    job = queue.get(job_id)
    assert (job.state, job.attempts) == ("queued", 0), (job.state, job.error)
    assert job.checkpoint["i"] >= 2


def test_generator_and_async_generator_tasks_checkpoint_at_each_yield(queue):
    @queue.task
    def counts(ctx, n=4):
        for i in range(1, n + 1):
            yield {"i": i}
        return {"counted": n}

    @queue.task
    async def acounts(ctx, n=4):
        for i in range(1, n + 1):
            await asyncio.sleep(0)
            yield {"i": i}

    plain, asynchronous = queue.enqueue("counts"), queue.enqueue("acounts")
    run_burst(queue)
    job = queue.get(plain)
    assert (job.state, job.result, job.checkpoint) == ("done", {"counted": 4}, {"i": 4})
    job = queue.get(asynchronous)
    assert (job.state, job.result, job.checkpoint) == ("done", None, {"i": 4}), job.error


def test_the_builtin_demo_tasks_still_run(queue):
    tasks = litequeue.builtin_tasks(queue, demos=True)
    echo = queue.enqueue("echo", {"n": 1})
    chunked = queue.enqueue("chunked", {"chunks": 3, "chunk_s": 0.01})
    sup = litequeue.Supervisor(queue, tasks=tasks, burst=True, poll=0.05)
    assert sup.run() == 0
    assert queue.get(echo).result == {"n": 1}
    assert queue.get(chunked).state == "done"
