"""The supervisor's decisions, each a pure function tested alone with a table of cases (as
test_memory.py tests plan_memory), and one real run for the decision a review found
untested: a checkpoint saved in an earlier attempt does not make a memory stop free."""

import os
import signal
import time

import pytest

import litequeue
from litequeue import (CANCELLED, CRITICAL, DONE, ENDING_FAILED, ENDING_REQUEUED,
                       EXIT_CHILD_STOPPED, FAILED_ERROR, FAILED_PERMANENT, HIGH, LOW, NORMAL,
                       STOP_CANCEL, STOP_EMERGENCY, STOP_MEMORY, STOP_OUTPUT, STOP_PREEMPT,
                       STOP_SHUTDOWN, STOP_START, STOP_TIMEOUT,
                       Ending, RunFacts, aged_priority, ahead_wanted, claimable_priorities,
                       limits_verdict, run_ending, shutdown_stops)
from conftest import wait_for

MiB = 1 << 20
GRACE, START = 10.0, 10.0


# --------------------------------------------------------------------------------------
# limits_verdict: what a run's limits call for
# --------------------------------------------------------------------------------------

def verdict(tick=100.0, **facts):
    found = limits_verdict(RunFacts(**facts), tick, grace_s=GRACE, start_deadline_s=START)
    return None if found is None else (found.action, found.reason, found.kill_at_tick)


@pytest.mark.parametrize("facts, expected", [
    # within every limit: nothing
    (dict(own_bytes=99 * MiB, limit_bytes=100 * MiB, age_s=5), None),
    (dict(own_bytes=100 * MiB, limit_bytes=100 * MiB), None),            # at the limit: fits
    # over its memory limit: killed for it, whatever it was asked before...
    (dict(own_bytes=100 * MiB + 1, limit_bytes=100 * MiB), ("kill", STOP_MEMORY, None)),
    (dict(own_bytes=500 * MiB, limit_bytes=100 * MiB, stop_reason=STOP_PREEMPT,
          kill_at_tick=105.0), ("kill", STOP_MEMORY, None)),
    (dict(own_bytes=500 * MiB, limit_bytes=100 * MiB, stop_reason=STOP_TIMEOUT,
          kill_at_tick=105.0), ("kill", STOP_MEMORY, None)),
    # ...except a cancel, which stays a cancel (never a failure)
    (dict(own_bytes=500 * MiB, limit_bytes=100 * MiB, stop_reason=STOP_CANCEL,
          kill_at_tick=105.0), ("kill", STOP_CANCEL, None)),
    # already killed: nothing more
    (dict(own_bytes=500 * MiB, limit_bytes=100 * MiB, killed=True), None),
    # a child that never started its task: the start deadline, exclusive
    (dict(started=False, age_s=START), None),
    (dict(started=False, age_s=START + 0.01), ("kill", STOP_START, None)),
    # the timeout: SIGTERM, then SIGKILL after min(grace, 5 s)
    (dict(timeout_s=30.0, age_s=30.0), None),
    (dict(timeout_s=30.0, age_s=30.01), ("term", STOP_TIMEOUT, 105.0)),
    # a timeout does not overtake another stop already asked
    (dict(timeout_s=30.0, age_s=31, stop_reason=STOP_PREEMPT, kill_at_tick=200.0), None),
    # a stop whose grace ran out: killed, keeping the reason it was asked for
    (dict(stop_reason=STOP_PREEMPT, kill_at_tick=100.0), ("kill", STOP_PREEMPT, None)),
    (dict(stop_reason=STOP_SHUTDOWN, kill_at_tick=100.01), None),
    (dict(stop_reason=STOP_CANCEL, kill_at_tick=99.0), ("kill", STOP_CANCEL, None)),
    (dict(stop_reason=STOP_TIMEOUT, kill_at_tick=99.0, timeout_s=1.0, age_s=9),
     ("kill", STOP_TIMEOUT, None)),
    # the output limit: stopped like a timeout, at the limit still fits, none set: no limit
    (dict(output_bytes=100 * MiB, output_limit_bytes=100 * MiB), None),
    (dict(output_bytes=100 * MiB + 1, output_limit_bytes=100 * MiB), ("term", STOP_OUTPUT, 105.0)),
    (dict(output_bytes=1 << 40), None),
    # memory first, and an output limit does not overtake another stop already asked
    (dict(output_bytes=200 * MiB, output_limit_bytes=100 * MiB, own_bytes=500 * MiB,
          limit_bytes=100 * MiB), ("kill", STOP_MEMORY, None)),
    (dict(output_bytes=200 * MiB, output_limit_bytes=100 * MiB, stop_reason=STOP_CANCEL,
          kill_at_tick=200.0), None),
    (dict(stop_reason=STOP_OUTPUT, kill_at_tick=99.0, output_bytes=200 * MiB,
          output_limit_bytes=100 * MiB), ("kill", STOP_OUTPUT, None)),
])
def test_limits_verdict(facts, expected):
    assert verdict(**facts) == expected


def test_a_short_grace_bounds_the_timeout_kill():
    found = limits_verdict(RunFacts(timeout_s=1.0, age_s=2.0), 50.0, grace_s=2.0,
                           start_deadline_s=START)
    assert (found.action, found.kill_at_tick) == ("term", 52.0)


def test_an_output_stop_names_the_limit_and_fails_the_job():
    found = limits_verdict(RunFacts(output_bytes=3 * MiB, output_limit_bytes=2 * MiB), 1.0,
                           grace_s=GRACE, start_deadline_s=START)
    assert found.detail == "output limit exceeded (2 MiB)"
    assert run_ending(None, current=True, stop_reason=STOP_OUTPUT, detail=found.detail,
                      exit_code=EXIT_CHILD_STOPPED, saved=True) == Ending(
        ENDING_FAILED, "output limit exceeded (2 MiB)")


def test_a_grace_kill_says_why_it_was_asked_to_stop():
    found = limits_verdict(RunFacts(stop_reason=STOP_PREEMPT, detail="preempted at 90.0%",
                                    kill_at_tick=1.0), 2.0, grace_s=GRACE, start_deadline_s=START)
    assert found.detail == "preempted at 90.0%: no checkpoint within the grace"


# --------------------------------------------------------------------------------------
# run_ending: what an ended run becomes
# --------------------------------------------------------------------------------------

RESULT = (DONE, '{"ok":1}')
RAISED = ("failed", FAILED_ERROR, "Traceback...\nValueError: boom")
PERMANENT = ("failed", FAILED_PERMANENT, "permanent failure: bad input")


def ending(reported=None, *, current=True, stop_reason=None, detail=None, exit_code=0,
           saved=False, started=True):
    return run_ending(reported, current=current, stop_reason=stop_reason, detail=detail,
                      exit_code=exit_code, saved=saved, started=started)


def requeued(reason, *, charge=False, preempted=False):
    return Ending(ENDING_REQUEUED, reason, charge=charge, preempted=preempted)


def failed(reason, *, permanent=False):
    return Ending(ENDING_FAILED, reason, retryable=not permanent, breaker_failure=not permanent)


@pytest.mark.parametrize("case, expected", [
    # a task that returned is done, whatever was asked of it meanwhile
    (dict(reported=RESULT), Ending(DONE, result='{"ok":1}')),
    (dict(reported=RESULT, stop_reason=STOP_CANCEL), Ending(DONE, result='{"ok":1}')),
    (dict(reported=RESULT, stop_reason=STOP_MEMORY, exit_code=-9),
     Ending(DONE, result='{"ok":1}')),
    # a cancel is never a failure, however the task then ended
    (dict(stop_reason=STOP_CANCEL, exit_code=-9), Ending(CANCELLED, "cancelled")),
    (dict(reported=RAISED, stop_reason=STOP_CANCEL), Ending(CANCELLED, "cancelled")),
    (dict(current=False, stop_reason=STOP_CANCEL), Ending(CANCELLED, "cancelled")),
    # a task that raised: a failure for its breaker; Permanent: dead at once, no breaker
    (dict(reported=RAISED), failed(RAISED[2])),
    (dict(reported=RAISED, stop_reason=STOP_PREEMPT), failed(RAISED[2])),
    (dict(reported=PERMANENT), failed(PERMANENT[2], permanent=True)),
    # handed over and never started: back uncharged, whatever became of the child
    (dict(current=False, exit_code=-9), requeued("handed back before it started")),
    (dict(current=False, stop_reason=STOP_SHUTDOWN, detail="supervisor shutting down"),
     requeued("supervisor shutting down")),
    # stopped for memory: free if it saved in this run, charged if not
    (dict(stop_reason=STOP_PREEMPT, detail="preempted", exit_code=EXIT_CHILD_STOPPED,
          saved=True), requeued("preempted", preempted=True)),
    (dict(stop_reason=STOP_PREEMPT, detail="preempted", exit_code=-9, saved=False),
     requeued("memory pressure: preempted, stopped before saving a checkpoint", charge=True,
              preempted=True)),
    (dict(stop_reason=STOP_EMERGENCY, detail="emergency", exit_code=-9, saved=True),
     requeued("emergency", preempted=True)),
    (dict(stop_reason=STOP_EMERGENCY, detail="emergency", exit_code=-9, saved=False),
     requeued("memory pressure: emergency, stopped before saving a checkpoint", charge=True,
              preempted=True)),
    # a shutdown never charges, saved or not
    (dict(stop_reason=STOP_SHUTDOWN, detail="bye", exit_code=-9), requeued("bye")),
    (dict(stop_reason=STOP_SHUTDOWN, detail="bye", exit_code=EXIT_CHILD_STOPPED, saved=True),
     requeued("bye")),
    # the child acted on a signal from outside before we asked (systemd's SIGTERM to all)
    (dict(exit_code=EXIT_CHILD_STOPPED), requeued("stopped by SIGTERM from outside")),
    (dict(exit_code=-signal.SIGTERM), requeued("stopped by SIGTERM from outside")),
    # its own limits: failures, with the figures
    (dict(stop_reason=STOP_MEMORY, detail="memory limit exceeded: 500 MiB > 100 MiB",
          exit_code=-9), failed("memory limit exceeded: 500 MiB > 100 MiB")),
    (dict(stop_reason=STOP_TIMEOUT, detail="timeout after 1s", exit_code=-15),
     failed("timeout after 1s")),
    (dict(stop_reason=STOP_START, detail="the child did not start", exit_code=-9),
     failed("the child did not start")),
    # a crash
    (dict(exit_code=-11), failed("killed by signal 11")),
    (dict(exit_code=3), failed("child exited with code 3 without recording a result")),
])
def test_run_ending(case, expected):
    assert ending(**case) == expected


# --------------------------------------------------------------------------------------
# shutdown_stops, claimable_priorities, ahead_wanted
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("stop_now, runs, expected", [
    (False, [(1, None), (2, STOP_PREEMPT), (3, STOP_CANCEL), (4, STOP_TIMEOUT)],
     {1: "ask", 2: "ask", 3: None, 4: None}),
    (True, [(1, None), (2, STOP_CANCEL)], {1: "kill", 2: "kill"}),
    (False, [], {}),
])
def test_shutdown_stops(stop_now, runs, expected):
    assert shutdown_stops(runs, stop_now=stop_now) == expected


@pytest.mark.parametrize("level, stopping, expected", [
    ("normal", False, (0, 1, 2, 3)),
    ("skip", False, (0, 1, 2)),
    ("preempt", False, (0, 1)),
    ("emergency", False, (0,)),
    ("normal", True, ()),
    ("emergency", True, ()),
])
def test_claimable_priorities(level, stopping, expected):
    assert claimable_priorities(level, stopping) == expected


AGE = 600.0


@pytest.mark.parametrize("priority, waited_s, age_s, expected", [
    # not waited long enough: its own priority, up to the boundary (exclusive)
    (LOW, 0.0, AGE, LOW),
    (LOW, AGE - 0.001, AGE, LOW),
    (NORMAL, AGE - 0.001, AGE, NORMAL),
    (LOW, -50.0, AGE, LOW),                        # not even due yet
    # one step per whole age_s waited, from the boundary on
    (LOW, AGE, AGE, NORMAL),
    (LOW, 2 * AGE - 0.001, AGE, NORMAL),
    (LOW, 2 * AGE, AGE, HIGH),
    (NORMAL, AGE, AGE, HIGH),
    # capped at high, however long it waited: critical is never earned by waiting
    (LOW, 3 * AGE, AGE, HIGH),
    (LOW, 1e9, AGE, HIGH),
    (NORMAL, 1e9, AGE, HIGH),
    (HIGH, 1e9, AGE, HIGH),
    (CRITICAL, 1e9, AGE, CRITICAL),
    # aging off: 0 (serve --age 0) or None (Queue.claim's default)
    (LOW, 1e9, 0.0, LOW),
    (NORMAL, 1e9, None, NORMAL),
    # a short age, as tests and busy queues use
    (LOW, 1.5, 1.0, NORMAL),
    (LOW, 2.0, 1.0, HIGH),
])
def test_aged_priority(priority, waited_s, age_s, expected):
    assert aged_priority(priority, waited_s, age_s) == expected


@pytest.mark.parametrize("last_run_s, handed_ahead, capacity_left, expected", [
    (None, 0, 100, 0),                          # nothing known of its jobs yet
    (0.00001, 0, 100, litequeue.AHEAD_JOBS),    # no-op jobs: as many as allowed
    (0.00001, 3, 100, litequeue.AHEAD_JOBS - 3),
    (0.00001, litequeue.AHEAD_JOBS, 100, 0),
    (0.005, 0, 100, 4),                         # 5 ms jobs: 20 ms of work ahead
    (0.005, 1, 100, 3),
    (0.0099, 0, 100, 2),
    (0.00001, 0, 2, 2),                         # never past --jobs-per-child
    (0.00001, 0, 0, 0),
    (litequeue.AHEAD_WORK_S, 0, 100, 0),        # long jobs: one at a time
    (0.5, 0, 100, 0),
])
def test_ahead_wanted(last_run_s, handed_ahead, capacity_left, expected):
    assert ahead_wanted(last_run_s, handed_ahead, capacity_left) == expected


# --------------------------------------------------------------------------------------
# For real: a checkpoint of an earlier attempt does not make a memory stop free
# --------------------------------------------------------------------------------------

class ScriptedPressure:
    def __init__(self):
        self.pressure = 10.0
        self.budget_bytes = None

    def machine_percent(self):
        return self.pressure

    def read(self, child_pids=()):
        return litequeue.MemoryReading(self.pressure, self.pressure)


def test_a_checkpoint_saved_in_an_earlier_attempt_does_not_spare_a_memory_stop(queue):
    """Attempt 1 saves and fails; attempt 2 is killed in an emergency before it saves: that
    stop is charged (the job is out of attempts: dead, "memory pressure"), though the job
    holds a checkpoint from attempt 1."""
    @queue.task(max_attempts=2)
    def saves_once(ctx):
        if ctx.attempt == 1:
            ctx.save({"from": "attempt 1"})
            raise RuntimeError("first attempt fails")
        time.sleep(30)                              # attempt 2: never saves

    job_id = queue.enqueue("saves_once")
    probe = ScriptedPressure()
    sup = litequeue.Supervisor(queue, tasks=dict(queue.registry), probe=probe, poll=0.05,
                               hold=0.1)
    sup.register()
    try:
        wait_for(lambda: sup.step() and queue.get(job_id).attempts == 2
                 and sup._live_runs() and sup._live_runs()[0].started_tick is not None,
                 timeout=20)
        assert queue.get(job_id).checkpoint == {"from": "attempt 1"}
        probe.pressure = 97.0                       # emergency: killed at once
        wait_for(lambda: sup.step() and queue.get(job_id).state != "running", timeout=20)
    finally:
        sup.stop(now_=True)
        sup.abandon_children()
    job = queue.get(job_id)
    assert (job.state, job.attempts) == ("dead", 2), (job.state, job.error)
    assert job.error.startswith("memory pressure"), job.error


def test_permanent_ends_a_job_dead_at_once_and_spares_its_breaker(queue):
    """For real: a task raising litequeue.Permanent ends dead on its first attempt of three,
    with its reason, and the breaker counts nothing."""
    @queue.task(max_attempts=3, breaker_failures=1)
    def refuses(ctx):
        raise litequeue.Permanent("this input can never work")

    job_id = queue.enqueue("refuses")
    sup = litequeue.Supervisor(queue, tasks=dict(queue.registry), poll=0.05, burst=True)
    assert sup.run() == 0
    job = queue.get(job_id)
    assert (job.state, job.attempts) == ("dead", 1)
    assert job.error == "permanent failure: this input can never work"
    assert {b["task"]: b["state"] for b in litequeue.list_breakers(queue)}.get(
        "refuses", "closed") == "closed"


def test_a_cancelled_job_whose_task_then_raises_is_not_a_breaker_failure(queue, tmp_path):
    """For real: three running jobs cancelled, each task raising when asked to stop: all
    end cancelled and the breaker (opening at 3 failures) stays closed."""
    @queue.task(max_attempts=1)
    def raises_when_asked(ctx):
        while not ctx.stopping:
            time.sleep(0.01)
        raise RuntimeError("interrupted")

    ids = [queue.enqueue("raises_when_asked") for _ in range(3)]
    sup = litequeue.Supervisor(queue, tasks=dict(queue.registry), slots=3, poll=0.05)
    sup.register()
    try:
        wait_for(lambda: sup.step() and all(queue.get(i).state == "running" for i in ids)
                 and len(sup._live_runs()) == 3)
        with litequeue.Queue(queue.path) as other:
            for job_id in ids:
                other.cancel(job_id)
        wait_for(lambda: sup.step() and all(queue.get(i).state != "running" for i in ids))
    finally:
        sup.stop(now_=True)
        sup.abandon_children()
    assert [queue.get(i).state for i in ids] == ["cancelled"] * 3
    assert {b["task"]: b["state"] for b in litequeue.list_breakers(queue)}.get(
        "raises_when_asked", "closed") == "closed"


# --------------------------------------------------------------------------------------
# Options: built once, used as built
# --------------------------------------------------------------------------------------

def test_a_probe_passed_in_measures_against_the_budget(queue):
    probe = litequeue.MemoryProbe()
    sup = litequeue.Supervisor(queue, memory_budget="64M", probe=probe)
    assert sup.probe is probe and probe.budget_bytes == 64 * MiB
    with pytest.raises(litequeue.BadInput, match="disagree"):
        litequeue.Supervisor(queue, memory_budget="64M",
                             probe=litequeue.MemoryProbe(budget_bytes=128 * MiB))


def test_options_are_checked_once_and_errors_name_the_flags(queue):
    options = litequeue.SupervisorOptions(slots=3, memory_limit="200M", poll="0.1", grace="5s")
    sup = litequeue.Supervisor(queue, options)
    assert sup.options is options
    assert (sup.slots, sup.poll_s, sup.grace_s) == (3, 0.1, 5.0)
    assert options.memory_limit_bytes == 200 * MiB
    with pytest.raises(litequeue.BadInput, match="--memory-limit"):
        litequeue.SupervisorOptions(memory_limit="lots")
    with pytest.raises(litequeue.BadInput, match="not both"):
        litequeue.Supervisor(queue, options, slots=2)


def test_a_memory_stop_before_the_task_began_costs_no_attempt():
    assert ending(stop_reason=STOP_EMERGENCY, detail="emergency", exit_code=-9,
                  started=False) == requeued("emergency", preempted=True)


@pytest.mark.parametrize("reason, inherited", [
    (STOP_PREEMPT, STOP_PREEMPT),
    (STOP_EMERGENCY, STOP_EMERGENCY),
    (STOP_SHUTDOWN, STOP_SHUTDOWN),
    (STOP_MEMORY, STOP_SHUTDOWN),         # the finished job's own fault is not the next one's
    (STOP_TIMEOUT, STOP_SHUTDOWN),
    (STOP_CANCEL, STOP_SHUTDOWN),
])
def test_a_stop_for_a_finished_job_reaches_the_job_its_child_went_on_to(reason, inherited):
    job = lambda job_id: litequeue.Job({"id": job_id, "task": "t", "priority": 2})  # noqa: E731
    finished = litequeue._Run(job(1), None, 100 * MiB, 0.0)
    following = litequeue._Run(job(2), None, 100 * MiB, 0.0)
    finished.stop_reason, finished.detail, finished.killed = reason, "why", True
    litequeue._pass_on_stop(finished, following)
    assert (following.stop_reason, following.killed) == (inherited, True)
    assert following.detail == "its child was stopped for job 1 (why)"


# --------------------------------------------------------------------------------------
# The child's end of the pipe protocol, over real pipes
# --------------------------------------------------------------------------------------

def handover(job_id):
    fields = litequeue.Job({"id": job_id, "task": "echo", "priority": 2}).to_fields()
    return b"J " + litequeue.json.dumps({"job": fields, "memory_limit_bytes": MiB}).encode()


@pytest.fixture
def child_link():
    """A child's _ParentLink over real pipes: (link, the supervisor's read end of what the
    child says, the supervisor's write end of what it tells the child)."""
    to_parent_r, to_parent_w = os.pipe()
    from_parent_r, from_parent_w = os.pipe()
    yield litequeue._ParentLink(to_parent_w, from_parent_r), to_parent_r, from_parent_w
    for fd in (to_parent_r, to_parent_w, from_parent_r, from_parent_w):
        os.close(fd)


def test_a_drop_sent_after_jobs_handed_ahead_is_seen_before_they_start(child_link):
    link, said, tell = child_link
    os.write(tell, handover(1) + b"\n")
    job, _ = link.next_job(litequeue._ChildSignals())      # job 1 starts
    assert job.id == 1
    os.write(tell, handover(2) + b"\n" + handover(3) + b"\nX\n" + handover(4) + b"\n")
    job, limit = link.next_job(litequeue._ChildSignals())
    assert (job.id, limit) == (4, MiB)                     # 2 and 3 were dropped unstarted
    assert os.read(said, 100) == b"D [2, 3]\n"


def test_a_stop_asked_while_jobs_wait_ahead_starts_none_of_them(child_link):
    link, _, tell = child_link
    os.write(tell, handover(5) + b"\n")
    signals = litequeue._ChildSignals()
    signals.asked = True
    with pytest.raises(litequeue.StopRequested):
        link.next_job(signals)


def test_an_error_text_is_clipped_keeping_its_start_and_its_end():
    text = "Traceback (most recent call last):\n" + "x" * 200_000 + "\nValueError: the end"
    clipped = litequeue._clipped(text)
    assert len(clipped) < litequeue.MAX_ERROR_CHARS + 100
    assert clipped.startswith("Traceback") and clipped.endswith("ValueError: the end")
    assert litequeue._clipped("short") == "short"
