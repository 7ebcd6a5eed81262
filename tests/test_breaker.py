"""Circuit breaker: every transition through the Queue API with a frozen clock, the two-owner
half-open race, restart and reset, the command line, and a real crashing task under `serve`."""

import datetime
import json
import logging
import threading
import time

import pytest
from freezegun import freeze_time

import litequeue
from conftest import run_cli, write_app

T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
COOLDOWN_S = litequeue.BREAKER_COOLDOWN_S


# -- helpers ---------------------------------------------------------------------------

def breaker(q, task):
    """The task's breaker as `breaker list` shows it (state seen at now()), or None."""
    for row in litequeue.list_breakers(q):
        if row["task"] == task:
            return row
    return None


def state_of(q, task):
    row = breaker(q, task)
    return "closed" if row is None else row["state"]


def breaker_events(q, task):
    return [(e["from_state"], e["to_state"]) for e in q.events(kind="breaker")
            if e["task"] == task]


def claim_one(q, owner, task):
    """Claim the next job of one task; None when nothing of it is claimable."""
    jobs = q.claim(owner, tasks=[task], limit=1)
    assert len(jobs) <= 1
    return jobs[0] if jobs else None


def run_and_fail(q, task="flaky", owner="sup-a", error="RuntimeError: boom"):
    """Enqueue one job of task, claim it and record its failure (an exception in the child)."""
    job_id = q.enqueue(task, max_attempts=1)
    job = claim_one(q, owner, task)
    assert job is not None and job.id == job_id
    assert q.fail(job.id, owner, job.attempts, error) == litequeue.DEAD
    return job_id


def open_breaker(q, clock, task="flaky"):
    """Three failures one second apart; returns the time it opened."""
    for _ in range(3):
        run_and_fail(q, task)
        clock.tick(1)
    opened_at = breaker(q, task)["opened_at"]
    assert state_of(q, task) == "open"
    return opened_at


def advance_to(clock, at):
    clock.move_to(datetime.datetime.fromtimestamp(at, tz=datetime.timezone.utc))
    assert litequeue.now() == pytest.approx(at)


@pytest.fixture
def other_queue(db_path, queue):
    """A second Queue on the same file: another supervisor's view of it."""
    q = litequeue.Queue(db_path)
    yield q
    q.close()


# -- closed -> open, and the window --------------------------------------------------------

def test_three_failures_within_the_window_open_the_breaker(queue):
    with freeze_time(T0) as clock:
        run_and_fail(queue)
        clock.tick(20)
        run_and_fail(queue)
        assert state_of(queue, "flaky") == "closed"
        assert breaker(queue, "flaky")["failures"] == 2
        clock.tick(39)                     # third failure 59 s after the first
        run_and_fail(queue)
        row = breaker(queue, "flaky")
        assert row["state"] == "open"
        assert row["opened_at"] == pytest.approx(litequeue.now())
        assert row["cooldown_s"] == COOLDOWN_S
        assert queue.status()["breakers"] == {"flaky": "open"}
        assert breaker_events(queue, "flaky") == [("closed", "open")]


def test_three_failures_spread_over_61_seconds_do_not_open_it(queue):
    with freeze_time(T0) as clock:
        run_and_fail(queue)                # t = 0
        clock.tick(30)
        run_and_fail(queue)                # t = 30
        clock.tick(31)
        run_and_fail(queue)                # t = 61: the first has left the 60 s window
        assert state_of(queue, "flaky") == "closed"
        assert breaker(queue, "flaky")["failures"] == 2
        assert breaker_events(queue, "flaky") == []
        job_id = queue.enqueue("flaky")
        assert claim_one(queue, "sup-a", "flaky").id == job_id   # still runs freely
        queue.complete(job_id, "sup-a", 1)
        clock.tick(1)
        run_and_fail(queue)                # t = 62: 30, 61, 62 are within 60 s
        assert state_of(queue, "flaky") == "open"


def test_failures_of_one_task_do_not_touch_another_tasks_breaker(queue):
    with freeze_time(T0) as clock:
        run_and_fail(queue, "flaky")
        run_and_fail(queue, "shaky")
        clock.tick(1)
        run_and_fail(queue, "flaky")
        run_and_fail(queue, "shaky")
        assert state_of(queue, "flaky") == state_of(queue, "shaky") == "closed"
        run_and_fail(queue, "flaky")
        assert state_of(queue, "flaky") == "open"
        assert state_of(queue, "shaky") == "closed"



# The window's edge, on the pure transition: two earlier failures, one `age` seconds old and
# one a second old, then a third now. A failure exactly window_s old still counts.
WINDOW_S, EPS = 60.0, 0.001


@pytest.mark.parametrize("age, opens", [
    (WINDOW_S - EPS, True),
    (WINDOW_S, True),
    (WINDOW_S + EPS, False),
], ids=["window-eps", "window", "window+eps"])
def test_a_failure_exactly_the_window_old_still_counts(age, opens):
    policy = litequeue.BreakerPolicy(failures=3, window_s=WINDOW_S, cooldown_s=COOLDOWN_S)
    at = 1000.0                                     # at - window_s is exact in floats
    row = {**litequeue.new_breaker("flaky", at - age),
           "failures": json.dumps([at - age, at - 1.0])}
    after = litequeue.breaker_after_failure(row, at, policy, job_id=3)
    if opens:
        assert (after["state"], after["opened_at"], after["cooldown_s"]) == (
            "open", at, COOLDOWN_S)
        assert litequeue.breaker_gate(after, at) == "blocked"
    else:
        assert after["state"] == "closed"
        assert json.loads(after["failures"]) == [at - 1.0, at]   # the old one left the window
        assert litequeue.breaker_gate(after, at) == "closed"


# -- open --------------------------------------------------------------------------------

def test_while_open_its_jobs_stay_queued_and_uncharged_and_others_run(queue):
    with freeze_time(T0) as clock:
        opened_at = open_breaker(queue, clock)
        blocked = [queue.enqueue("flaky") for _ in range(3)]
        steady = [queue.enqueue("steady") for _ in range(2)]
        advance_to(clock, opened_at + COOLDOWN_S - 0.5)

        claimed = queue.claim("sup-a", limit=10)
        assert sorted(job.id for job in claimed) == steady
        assert queue.claim("sup-a", tasks=["flaky"], limit=10) == []
        assert not queue.has_due(tasks=["flaky"])
        for job_id in blocked:
            job = queue.get(job_id)
            assert (job.state, job.attempts, job.started_at, job.owner) == (
                "queued", 0, None, None)
            assert queue.events(job_id=job_id) == []      # untouched
        assert queue.status()["breakers"]["flaky"] == "open"


def test_a_job_started_before_the_breaker_opened_may_still_finish(queue):
    with freeze_time(T0) as clock:
        early = queue.enqueue("flaky")
        running = claim_one(queue, "sup-a", "flaky")
        assert running.id == early
        open_breaker(queue, clock)
        queue.fail(running.id, "sup-a", running.attempts, "RuntimeError: late")
        row = breaker(queue, "flaky")
        assert row["state"] == "open" and row["cooldown_s"] == COOLDOWN_S
        assert queue.get(early).state == "queued"      # retried later, attempts 1 of 3
        assert queue.get(early).attempts == 1


# -- half-open: one trial, even with two owners ------------------------------------------

def test_after_the_cooldown_exactly_one_trial_runs_across_two_queues(queue, other_queue):
    with freeze_time(T0) as clock:
        opened_at = open_breaker(queue, clock)
        waiting = [queue.enqueue("flaky") for _ in range(3)]
        other = queue.enqueue("steady")

        advance_to(clock, opened_at + COOLDOWN_S - 0.01)
        assert claim_one(queue, "sup-a", "flaky") is None
        assert state_of(queue, "flaky") == "open"

        advance_to(clock, opened_at + COOLDOWN_S)
        assert state_of(other_queue, "flaky") == "half-open"   # cooldown over, no trial yet
        trial = queue.claim("sup-a", tasks=["flaky"], limit=3)
        assert [job.id for job in trial] == [waiting[0]]
        assert other_queue.claim("sup-b", tasks=["flaky"], limit=3) == []
        assert [job.id for job in other_queue.claim("sup-b", limit=3)] == [other]
        assert queue.claim("sup-a", tasks=["flaky"], limit=3) == []

        row = breaker(other_queue, "flaky")
        assert (row["state"], row["trial_job_id"]) == ("half-open", waiting[0])
        assert other_queue.status()["breakers"]["flaky"] == "half-open"
        for job_id in waiting[1:]:
            assert (queue.get(job_id).state, queue.get(job_id).attempts) == ("queued", 0)
        assert breaker_events(queue, "flaky") == [("closed", "open"), ("open", "half-open")]
        trial_event = queue.events(kind="breaker")[-1]
        assert trial_event["job_id"] == waiting[0]


def test_two_supervisors_racing_at_half_open_claim_one_trial(db_path, queue):
    """Real threads, real time: the breaker opened two minutes ago, so it is half-open now."""
    with freeze_time(datetime.datetime.fromtimestamp(time.time() - 120,
                                                     tz=datetime.timezone.utc)) as clock:
        open_breaker(queue, clock)
    for _ in range(6):
        queue.enqueue("flaky")
    assert state_of(queue, "flaky") == "half-open"

    barrier = threading.Barrier(2)
    claimed, errors = [], []

    def supervisor(owner):
        q = litequeue.Queue(db_path)
        try:
            barrier.wait()
            for _ in range(25):
                claimed.extend((owner, job.id) for job in q.claim(owner, tasks=["flaky"], limit=2))
        except Exception as exc:          # reported below, with the thread's name
            errors.append((owner, exc))
        finally:
            q.close()

    threads = [threading.Thread(target=supervisor, args=(f"sup-{n}",)) for n in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(claimed) == 1, claimed
    assert breaker(queue, "flaky")["trial_job_id"] == claimed[0][1]


def test_trial_success_closes_the_breaker(queue, other_queue):
    with freeze_time(T0) as clock:
        opened_at = open_breaker(queue, clock)
        ids = [queue.enqueue("flaky") for _ in range(3)]
        advance_to(clock, opened_at + COOLDOWN_S)
        trial = claim_one(queue, "sup-a", "flaky")
        queue.complete(trial.id, "sup-a", trial.attempts, {"ok": True})

        row = breaker(other_queue, "flaky")
        assert (row["state"], row["failures"], row["trial_job_id"]) == ("closed", 0, None)
        assert other_queue.status()["breakers"]["flaky"] == "closed"
        both = other_queue.claim("sup-b", tasks=["flaky"], limit=5)
        assert sorted(job.id for job in both) == ids[1:]
        assert breaker_events(queue, "flaky")[-1] == ("half-open", "closed")



TRIAL_JOB = 7


@pytest.mark.parametrize("trial_job_id, succeeded, state_after, gate_after", [
    (TRIAL_JOB, TRIAL_JOB, "closed", "closed"),            # the trial's success closes it
    (TRIAL_JOB, TRIAL_JOB + 1, "half-open", "blocked"),    # a job claimed before it opened
    (TRIAL_JOB, None, "half-open", "blocked"),
    (None, TRIAL_JOB + 1, "half-open", "trial"),           # trial released, none running
], ids=["the-trial", "another-job", "no-job-id", "no-trial-running"])
def test_only_the_trials_success_closes_a_half_open_breaker(trial_job_id, succeeded,
                                                           state_after, gate_after):
    at = 1000.0
    row = {**litequeue.new_breaker("flaky", at - 1), "state": "half-open",
           "opened_at": at - COOLDOWN_S - 1, "cooldown_s": COOLDOWN_S,
           "trial_job_id": trial_job_id}
    after = litequeue.breaker_after_success(row, succeeded, at)
    assert after["state"] == state_after
    assert litequeue.breaker_gate(after, at) == gate_after
    if state_after == "half-open":
        assert after == row                                 # untouched: the trial decides
    else:
        assert (after["failures"], after["trial_job_id"], after["opened_at"]) == ("[]", None,
                                                                                  None)


def test_a_stale_success_during_half_open_leaves_it_half_open(queue, other_queue):
    """A job claimed before the breaker opened succeeds while the trial runs: still one
    trial, still half-open, until the trial itself succeeds."""
    with freeze_time(T0) as clock:
        queue.enqueue("flaky")
        stale = claim_one(queue, "sup-a", "flaky")
        opened_at = open_breaker(queue, clock)
        queue.enqueue("flaky")
        waiting = queue.enqueue("flaky")
        advance_to(clock, opened_at + COOLDOWN_S)
        trial = claim_one(other_queue, "sup-b", "flaky")
        queue.complete(stale.id, "sup-a", stale.attempts)
        row = breaker(queue, "flaky")
        assert (row["state"], row["trial_job_id"]) == ("half-open", trial.id)
        assert claim_one(queue, "sup-a", "flaky") is None
        other_queue.complete(trial.id, "sup-b", trial.attempts)
        assert state_of(queue, "flaky") == "closed"
        assert claim_one(queue, "sup-a", "flaky").id == waiting

def test_trial_failure_reopens_with_doubled_cooldown_capped_at_ten_minutes(queue):
    with freeze_time(T0) as clock:
        opened_at = open_breaker(queue, clock)
        for _ in range(7):                              # six failed trials, one good
            queue.enqueue("flaky", max_attempts=1)
        cooldown = COOLDOWN_S
        for expected in (60, 120, 240, 480, 600, 600):
            advance_to(clock, opened_at + cooldown - 0.5)
            assert claim_one(queue, "sup-a", "flaky") is None
            advance_to(clock, opened_at + cooldown)
            trial = claim_one(queue, "sup-a", "flaky")
            assert trial is not None and state_of(queue, "flaky") == "half-open"
            assert queue.fail(trial.id, "sup-a", trial.attempts, "boom") == "dead"
            row = breaker(queue, "flaky")
            assert (row["state"], row["cooldown_s"]) == ("open", expected)
            assert row["opened_at"] == pytest.approx(litequeue.now())
            opened_at, cooldown = row["opened_at"], expected

        advance_to(clock, opened_at + cooldown)
        trial = claim_one(queue, "sup-a", "flaky")
        queue.complete(trial.id, "sup-a", trial.attempts)
        assert state_of(queue, "flaky") == "closed"
        open_breaker(queue, clock)                       # a new opening starts from 30 s again
        assert breaker(queue, "flaky")["cooldown_s"] == COOLDOWN_S


@pytest.mark.parametrize("how", ["preempted", "preempted-charged", "shutdown", "cancelled"])
def test_a_trial_that_ends_neither_well_nor_badly_releases_the_trial_slot(queue, other_queue,
                                                                          how):
    with freeze_time(T0) as clock:
        opened_at = open_breaker(queue, clock)
        first, second = queue.enqueue("flaky"), queue.enqueue("flaky")
        advance_to(clock, opened_at + COOLDOWN_S)
        trial = claim_one(queue, "sup-a", "flaky")
        assert trial.id == first
        assert claim_one(other_queue, "sup-b", "flaky") is None
        lease = (trial.id, "sup-a", trial.attempts)
        if how == "preempted":
            queue.requeue(*lease, "preempted at 88% memory pressure", charge=False, preempted=True)
        elif how == "preempted-charged":
            queue.requeue(*lease, "memory pressure: stopped before saving a checkpoint",
                          charge=True, preempted=True)
        elif how == "shutdown":
            queue.requeue(*lease, "supervisor shutting down", charge=False)
        else:
            assert queue.cancel(trial.id) == "running"
            queue.finish_cancelled(*lease)

        row = breaker(other_queue, "flaky")
        assert (row["state"], row["trial_job_id"], row["cooldown_s"]) == (
            "half-open", None, COOLDOWN_S)                # not counted as a failure
        retrial = claim_one(other_queue, "sup-b", "flaky")
        assert retrial is not None
        assert retrial.id == (second if how == "cancelled" else first)
        assert claim_one(queue, "sup-a", "flaky") is None  # still one trial at a time
        other_queue.complete(retrial.id, "sup-b", retrial.attempts)
        assert state_of(queue, "flaky") == "closed"


def test_preemption_cancellation_and_shutdown_are_not_failures(queue):
    with freeze_time(T0) as clock:
        for reason, kwargs in [("preempted", {"charge": False, "preempted": True}),
                               ("preempted uncheckpointed", {"charge": True, "preempted": True}),
                               ("shutdown", {"charge": False})] * 2:
            job_id = queue.enqueue("flaky", max_attempts=10)
            job = claim_one(queue, "sup-a", "flaky")
            queue.requeue(job.id, "sup-a", job.attempts, reason, **kwargs)
            queue.cancel(job_id)
            clock.tick(1)
        job_id = queue.enqueue("flaky")
        job = claim_one(queue, "sup-a", "flaky")
        queue.cancel(job_id)
        queue.finish_cancelled(job_id, "sup-a", job.attempts)
        assert state_of(queue, "flaky") == "closed"
        assert (breaker(queue, "flaky") or {"failures": 0})["failures"] == 0


def test_permanent_failures_do_not_count_and_a_permanent_trial_frees_its_slot(queue,
                                                                             other_queue):
    """A task that raised litequeue.Permanent: fail(retryable=False, breaker_failure=False)."""
    permanent = {"retryable": False, "breaker_failure": False}
    with freeze_time(T0) as clock:
        for _ in range(3):                  # three failures in a row would have opened it
            queue.enqueue("flaky", max_attempts=3)
            job = claim_one(queue, "sup-a", "flaky")
            assert queue.fail(job.id, "sup-a", job.attempts, "no such document",
                              **permanent) == litequeue.DEAD
            clock.tick(1)
        assert state_of(queue, "flaky") == "closed"
        assert (breaker(queue, "flaky") or {"failures": 0})["failures"] == 0

        opened_at = open_breaker(queue, clock)
        first, second = queue.enqueue("flaky"), queue.enqueue("flaky")
        advance_to(clock, opened_at + COOLDOWN_S)
        trial = claim_one(queue, "sup-a", "flaky")
        assert trial.id == first
        assert queue.fail(trial.id, "sup-a", trial.attempts, "no such document",
                          **permanent) == litequeue.DEAD
        row = breaker(other_queue, "flaky")
        assert (row["state"], row["trial_job_id"], row["cooldown_s"]) == (
            "half-open", None, COOLDOWN_S)
        assert claim_one(other_queue, "sup-b", "flaky").id == second     # the next trial


def test_jobs_cancelled_while_running_are_not_failures_however_their_tasks_end(queue):
    with freeze_time(T0) as clock:
        ids = [queue.enqueue("flaky", max_attempts=5) for _ in range(3)]
        jobs = queue.claim("sup-a", tasks=["flaky"], limit=3)
        assert [job.id for job in jobs] == ids
        for job in jobs:
            assert queue.cancel(job.id) == litequeue.RUNNING
        for job in jobs:                     # each task then raised (or was killed)
            assert queue.fail(job.id, "sup-a", job.attempts,
                              "RuntimeError: interrupted") == litequeue.CANCELLED
            clock.tick(1)
        assert [queue.get(job_id).state for job_id in ids] == ["cancelled"] * 3
        assert state_of(queue, "flaky") == "closed"
        assert (breaker(queue, "flaky") or {"failures": 0})["failures"] == 0


def test_a_cancelled_trial_that_raised_frees_the_slot_without_reopening(queue, other_queue):
    with freeze_time(T0) as clock:
        opened_at = open_breaker(queue, clock)
        first, second = queue.enqueue("flaky"), queue.enqueue("flaky")
        advance_to(clock, opened_at + COOLDOWN_S)
        trial = claim_one(queue, "sup-a", "flaky")
        assert trial.id == first
        queue.cancel(trial.id)
        assert queue.fail(trial.id, "sup-a", trial.attempts,
                          "RuntimeError: interrupted") == litequeue.CANCELLED
        row = breaker(other_queue, "flaky")
        assert (row["state"], row["trial_job_id"], row["cooldown_s"]) == (
            "half-open", None, COOLDOWN_S)
        assert claim_one(other_queue, "sup-b", "flaky").id == second


def test_a_stale_failure_during_half_open_does_not_overrule_the_trial(queue, other_queue):
    """A job claimed before the breaker opened fails while the trial runs: the trial, not
    the stale job, decides (as a stale failure while open is ignored)."""
    with freeze_time(T0) as clock:
        queue.enqueue("flaky")
        stale = claim_one(queue, "sup-a", "flaky")       # e.g. a long job with a timeout
        opened_at = open_breaker(queue, clock)
        queue.enqueue("flaky")
        advance_to(clock, opened_at + COOLDOWN_S)
        trial = claim_one(other_queue, "sup-b", "flaky")
        queue.fail(stale.id, "sup-a", stale.attempts, "timeout after 600s")
        other_queue.complete(trial.id, "sup-b", trial.attempts)
        assert state_of(queue, "flaky") == "closed"


# -- restart and reset ---------------------------------------------------------------------

def test_restart_while_open_is_still_open(db_path):
    with freeze_time(T0) as clock:
        first = litequeue.Queue(db_path)
        opened_at = open_breaker(first, clock)
        job_id = first.enqueue("flaky")
        first.close()

        advance_to(clock, opened_at + 10)
        restarted = litequeue.Queue(db_path)          # a new supervisor after a restart
        try:
            assert state_of(restarted, "flaky") == "open"
            assert restarted.status()["breakers"] == {"flaky": "open"}
            assert claim_one(restarted, "sup-new", "flaky") is None
            assert restarted.get(job_id).attempts == 0
            advance_to(clock, opened_at + COOLDOWN_S)
            assert claim_one(restarted, "sup-new", "flaky").id == job_id
        finally:
            restarted.close()


def test_reset_breaker_closes_it_and_forgets_the_failures(queue):
    with freeze_time(T0) as clock:
        open_breaker(queue, clock)
        job_id = queue.enqueue("flaky")
        assert litequeue.reset_breaker(queue, "flaky") == "open"
        row = breaker(queue, "flaky")
        assert (row["state"], row["failures"], row["opened_at"], row["cooldown_s"]) == (
            "closed", 0, None, None)
        assert claim_one(queue, "sup-a", "flaky").id == job_id
        queue.complete(job_id, "sup-a", 1)
        run_and_fail(queue)
        run_and_fail(queue)
        assert state_of(queue, "flaky") == "closed"     # the old failures are gone
        reset = [e for e in queue.events(kind="breaker") if e["to_state"] == "closed"]
        assert [(e["from_state"], e["reason"]) for e in reset] == [("open", "reset by hand")]


def test_reset_during_a_trial_closes_and_the_trial_result_changes_nothing(queue):
    with freeze_time(T0) as clock:
        opened_at = open_breaker(queue, clock)
        queue.enqueue("flaky")
        queue.enqueue("flaky")
        advance_to(clock, opened_at + COOLDOWN_S)
        trial = claim_one(queue, "sup-a", "flaky")
        assert litequeue.reset_breaker(queue, "flaky") == "half-open"
        assert claim_one(queue, "sup-b", "flaky") is not None   # closed: runs freely
        queue.complete(trial.id, "sup-a", trial.attempts)
        assert state_of(queue, "flaky") == "closed"


# -- events and logs -----------------------------------------------------------------------

def test_every_transition_is_an_event_and_a_log_line(queue, caplog):
    caplog.set_level(logging.WARNING, logger="litequeue")
    with freeze_time(T0) as clock:
        opened_at = open_breaker(queue, clock)                      # closed -> open
        advance_to(clock, opened_at + COOLDOWN_S)
        queue.enqueue("flaky", max_attempts=1)
        trial = claim_one(queue, "sup-a", "flaky")                  # open -> half-open
        queue.fail(trial.id, "sup-a", trial.attempts, "boom")       # half-open -> open
        advance_to(clock, litequeue.now() + 2 * COOLDOWN_S)
        queue.enqueue("flaky", max_attempts=1)
        trial = claim_one(queue, "sup-a", "flaky")                  # open -> half-open
        queue.complete(trial.id, "sup-a", trial.attempts)           # half-open -> closed
        open_breaker(queue, clock)                                  # closed -> open
        litequeue.reset_breaker(queue, "flaky")                     # open -> closed

    expected = [("closed", "open"), ("open", "half-open"), ("half-open", "open"),
                ("open", "half-open"), ("half-open", "closed"), ("closed", "open"),
                ("open", "closed")]
    events = [e for e in queue.events(kind="breaker") if e["task"] == "flaky"]
    assert [(e["from_state"], e["to_state"]) for e in events] == expected
    assert all(e["reason"] for e in events)
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("breaker flaky")]
    assert [tuple(m.split(": ", 1)[1].split(" (")[0].split(" -> ")) for m in logged] == expected


# -- the command line ----------------------------------------------------------------------

def test_cli_breaker_list_status_json_and_reset(db_path, queue):
    """Real processes, real time: alpha opened just now, beta two minutes ago (so half-open),
    gamma failed once (closed)."""
    class RealClock:
        def tick(self, _):
            pass
    open_breaker(queue, RealClock(), "alpha")
    with freeze_time(datetime.datetime.fromtimestamp(time.time() - 120,
                                                     tz=datetime.timezone.utc)) as clock:
        open_breaker(queue, clock, "beta")
    run_and_fail(queue, "gamma")
    expected = {"alpha": "open", "beta": "half-open", "gamma": "closed"}

    listed = run_cli("breaker", "list", db=db_path)
    assert listed.returncode == 0, listed.stderr
    assert {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines()} == expected

    as_json = run_cli("breaker", "list", "--json", db=db_path)
    assert as_json.returncode == 0, as_json.stderr
    assert {b["task"]: b["state"] for b in json.loads(as_json.stdout)} == expected

    status = run_cli("status", "--json", db=db_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["breakers"] == expected

    reset = run_cli("breaker", "reset", "alpha", db=db_path)
    assert reset.returncode == 0, reset.stderr
    assert reset.stdout.strip() == "alpha: open -> closed"
    status = json.loads(run_cli("status", "--json", db=db_path).stdout)
    assert status["breakers"] == {**expected, "alpha": "closed"}
    assert state_of(queue, "alpha") == "closed"
    job_id = queue.enqueue("alpha")
    assert claim_one(queue, "sup-a", "alpha").id == job_id
    assert breaker_events(queue, "alpha")[-1] == ("open", "closed")


# -- a real crashing task under `serve` -----------------------------------------------------

def test_a_task_crashing_its_child_three_times_opens_its_breaker_under_serve(tmp_path, db_path):
    app = write_app(tmp_path, """
        @queue.task(max_attempts=1)
        def crash(ctx):
            os.abort()

        @queue.task
        def steady(ctx, n):
            return {"n": n}

        @queue.task
        def also_steady(ctx):
            return "fine"
    """)
    q = litequeue.Queue(db_path)
    try:
        crashing = [q.enqueue("crash", max_attempts=1) for _ in range(4)]
        others = [q.enqueue("steady", {"n": n}) for n in range(3)] + [q.enqueue("also_steady")]
    finally:
        q.close()

    # One slot: the three crashes are settled one after another before the fourth is looked at.
    served = run_cli("serve", "--app", app, "--slots", "1", "--burst", "--poll", "0.05",
                     db=db_path, env={"LITEQUEUE_DB": db_path}, timeout=60)
    assert served.returncode == 0, served.stderr
    assert "breaker crash: closed -> open" in served.stderr

    q = litequeue.Queue(db_path)
    try:
        for job_id in crashing[:3]:
            job = q.get(job_id)
            assert job.state == "dead"
            assert "signal 6" in job.error
        fourth = q.get(crashing[3])
        assert (fourth.state, fourth.attempts, fourth.started_at) == ("queued", 0, None)
        assert [q.get(job_id).state for job_id in others] == ["done"] * 4
        assert q.get(others[1]).result == {"n": 1}
        assert breaker(q, "crash")["state"] == "open"
        assert q.status()["breakers"]["crash"] == "open"
        assert ("closed", "open") in breaker_events(q, "crash")
    finally:
        q.close()

    # A restarted supervisor honours the open breaker too, and --burst does not wait for it.
    again = run_cli("serve", "--app", app, "--burst", "--poll", "0.05", db=db_path,
                    env={"LITEQUEUE_DB": db_path}, timeout=60)
    assert again.returncode == 0, again.stderr
    q = litequeue.Queue(db_path)
    try:
        assert (q.get(crashing[3]).state, q.get(crashing[3]).attempts) == ("queued", 0)
    finally:
        q.close()


def test_a_task_declares_its_own_breaker_thresholds(tmp_path):
    """@task(breaker_failures=1) opens that task's breaker on its first failure, while another
    task keeps the global three, and a second process (no registry) applies the stored value."""
    path = str(tmp_path / "own.db")
    app = litequeue.Queue(path)

    @app.task(breaker_failures=1, breaker_window=10, max_attempts=5)
    def fragile(ctx):
        pass

    @app.task(max_attempts=5)
    def sturdy(ctx):
        pass

    worker = litequeue.Queue(path)          # knows the thresholds only from the catalogue
    for name in ("fragile", "sturdy"):
        worker.enqueue(name)
        job = worker.claim("w", tasks=[name])[0]
        worker.fail(job.id, "w", job.attempts, "boom")
    states = {b["task"]: b["state"] for b in litequeue.list_breakers(worker)}
    assert states == {"fragile": "open", "sturdy": "closed"}
    assert app.catalogue()["fragile"].breaker_failures == 1
    assert app.catalogue()["fragile"].breaker_window_s == 10.0


def test_reset_of_a_task_the_file_never_heard_of_is_bad_input(tmp_path):
    db = tmp_path / "reset.db"
    litequeue.Queue(str(db)).close()
    result = run_cli("breaker", "reset", "no_such_task", db=db)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no_such_task" in result.stderr
    assert "Traceback" not in result.stderr
