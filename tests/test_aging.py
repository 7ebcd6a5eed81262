"""Priority aging (serve --age): a job that has waited long past its due time is claimed as
one priority higher per age_s waited, up to high, on real files with explicit claim times;
the claim order against aged_priority as a property; and a real `serve --burst` where a low
job queued first runs before a backlog of high work is drained (and last with --age 0)."""

import datetime
import os
import tempfile

import apsw
import pytest
from freezegun import freeze_time
from hypothesis import HealthCheck, given, settings, strategies as st

import litequeue
from litequeue import CRITICAL, HIGH, LOW, NORMAL, aged_priority
from conftest import run_cli

T0 = 1_800_000_000.0          # whole seconds: due times and cutoffs are exact floats
AGE = 100.0


def frozen(at):
    return freeze_time(datetime.datetime.fromtimestamp(at, datetime.timezone.utc))


def enqueue_at(queue, due_at, task="echo", **options):
    """A job due at `due_at` (enqueued then, so it is due at once)."""
    with frozen(due_at):
        return queue.enqueue(task, **options)


def claimed_ids(queue, at, **options):
    return [job.id for job in queue.claim("w1", at=at, **options)]


def claim_all(queue, at, **options):
    """Claim one at a time until nothing is left: the order a supervisor with one slot sees."""
    order = []
    while jobs := queue.claim("w1", at=at, **options):
        order += [job.id for job in jobs]
    return order


# -- the claim order -----------------------------------------------------------------------

@pytest.mark.parametrize("after_s, age_s, expected", [
    # low waited 160 s: aged one step, to normal; it ranks after high, and before the normal
    # that is fresher (same level: due time decides)
    (160, AGE, ["high", "low", "normal"]),
    # low waited 200 s: aged two steps, to high, and due before the fresh high
    (200, AGE, ["low", "high", "normal"]),
    # the boundary: exactly 2 * age_s waited counts
    (199.5, AGE, ["high", "low", "normal"]),
    # normal aged too (waited 100 s of 100): high; low (250 s) high and oldest
    (250, AGE, ["low", "high", "normal"]),
    # off: own priority only, however long they waited
    (10_000, 0, ["high", "normal", "low"]),
    (10_000, None, ["high", "normal", "low"]),
])
def test_an_aged_job_is_claimed_as_a_higher_priority(queue, after_s, age_s, expected):
    ids = {"low": enqueue_at(queue, T0, priority="low")}
    ids["high"] = enqueue_at(queue, T0 + 150, priority="high")
    ids["normal"] = enqueue_at(queue, T0 + 150)
    names = {job_id: name for name, job_id in ids.items()}
    order = claim_all(queue, T0 + after_s, age_s=age_s)
    assert [names[job_id] for job_id in order] == expected
    # Nothing stored changes: the claimed rows keep their own priority.
    assert {queue.get(ids[name]).priority for name in ids} == {"low", "high", "normal"}


def test_aging_stops_at_high_and_never_beats_critical(queue):
    older_high = enqueue_at(queue, T0 - 1, priority="high")
    low = enqueue_at(queue, T0, priority="low")
    normal = enqueue_at(queue, T0 + 1)
    critical = enqueue_at(queue, T0 + 5000, priority="critical")
    fresh_high = enqueue_at(queue, T0 + 5000, priority="high")
    # Waited 100 ages: all three are high now, in due order; none passes critical, nor the
    # high job due before them.
    assert claim_all(queue, T0 + 100 * AGE, age_s=AGE) == [
        critical, older_high, low, normal, fresh_high]


def test_several_claims_in_one_transaction_keep_the_merged_order(queue):
    lows = [enqueue_at(queue, T0 + i, priority="low") for i in range(3)]           # high
    normals = [enqueue_at(queue, T0 + 150 + i) for i in range(3)]                  # high
    highs = [enqueue_at(queue, T0 + 100 + 2 * i, priority="high") for i in range(3)]
    fresh = [enqueue_at(queue, T0 + 290 + i) for i in range(2)]                    # normal
    fresh_low = enqueue_at(queue, T0 + 200, priority="low")                        # normal
    at = T0 + 300
    expected = [*lows, highs[0], highs[1], highs[2], *normals, fresh_low, *fresh]
    assert claimed_ids(queue, at, age_s=AGE, limit=5) == expected[:5]
    assert claimed_ids(queue, at, age_s=AGE, limit=50) == expected[5:]


def test_own_priority_still_decides_which_jobs_may_be_claimed(queue):
    """claimable_priorities (the memory level) filters by a job's own priority: a low job
    aged to high is still not started at the skip level."""
    low = enqueue_at(queue, T0, priority="low")
    normal = enqueue_at(queue, T0 + 500)
    at = T0 + 10 * AGE
    assert claimed_ids(queue, at, age_s=AGE, priorities=(0, 1, 2), limit=5) == [normal]
    assert queue.get(low).state == "queued"
    assert claimed_ids(queue, at, age_s=AGE, priorities=(3,)) == [low]


def test_an_expired_aged_job_is_not_claimed(queue):
    expired = enqueue_at(queue, T0, priority="low", ttl=150)           # expires T0 + 150
    high = enqueue_at(queue, T0 + 100, priority="high")
    live_low = enqueue_at(queue, T0 + 1, priority="low")
    # Both lows waited over 2 * AGE (aged to high, due first); the expired one is passed over.
    assert claimed_ids(queue, T0 + 250, age_s=AGE, limit=5) == [live_low, high]
    assert queue.expire(at=T0 + 250) == [expired]


def open_breaker(queue, task, at):
    """Three failures of `task` at `at`: its breaker opens (cooldown 30 s)."""
    with frozen(at):
        for _ in range(litequeue.BREAKER_FAILURES):
            job_id = queue.enqueue(task, max_attempts=1)
            (job,) = queue.claim("w0", tasks=[task])
            assert job.id == job_id
            queue.fail(job.id, "w0", job.attempts, "boom")
        assert queue.status()["breakers"][task] == "open"


def test_aged_jobs_behind_an_open_breaker_stay_queued(queue):
    open_breaker(queue, "flaky", T0 + 200)
    blocked = enqueue_at(queue, T0, "flaky", priority="low")
    high = enqueue_at(queue, T0 + 150, priority="high")
    assert claimed_ids(queue, T0 + 210, age_s=AGE, limit=5) == [high]
    assert queue.get(blocked).state == "queued"


def test_a_half_open_breaker_lets_exactly_one_trial_through_the_merge(queue):
    """The trial's task may head two sources (its aged low job and its high job): once the
    trial is claimed, the other head is dropped."""
    open_breaker(queue, "flaky", T0 + 200)
    aged = enqueue_at(queue, T0, "flaky", priority="low")
    enqueue_at(queue, T0 + 150, "flaky", priority="high")
    other = enqueue_at(queue, T0 + 160, priority="high")
    at = T0 + 200 + litequeue.BREAKER_COOLDOWN_S + 1                   # half-open: one trial
    assert claimed_ids(queue, at, age_s=AGE, limit=5) == [aged, other]


def test_complete_and_claim_ages_too(queue):
    first = enqueue_at(queue, T0, priority="high")
    low = enqueue_at(queue, T0, priority="low")
    enqueue_at(queue, T0 + 250, priority="high")
    (job,) = queue.claim("w1", at=T0 + 300, age_s=AGE)
    assert job.id == first
    with frozen(T0 + 300):
        following = queue.complete_and_claim(first, "w1", job.attempts, age_s=AGE)
    assert following.id == low


@pytest.mark.parametrize("age_s", [-1.0, float("nan")])
def test_a_negative_age_is_bad_input(queue, age_s):
    enqueue_at(queue, T0, priority="low")
    with pytest.raises(litequeue.BadInput):
        queue.claim("w1", at=T0 + 1, age_s=age_s)


def _bulk_queue(path, count, first_due, priority):
    conn = apsw.Connection(str(path))
    conn.set_busy_timeout(5000)
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
        " INSERT INTO jobs (task, priority, state, max_attempts, created_at, due_at)"
        " SELECT 'echo', ?, 'queued', 3, ?, ? + i FROM n",
        (count, priority, first_due, first_due))
    conn.close()


def _claim_steps(queue, at):
    steps = []
    queue.conn.set_progress_handler(lambda: steps.append(1) or False, 10)
    try:
        assert len(queue.claim("w1", at=at, age_s=AGE)) == 1
    finally:
        queue.conn.set_progress_handler(None)
    return len(steps)


def test_an_aging_claim_costs_the_same_on_a_big_backlog(queue):
    """The oldest due time of each priority and each source's head are index seeks: a claim
    that merges aged low and normal work with high does not scan the backlog."""
    for priority in (HIGH, NORMAL, LOW):
        _bulk_queue(queue.path, 300, T0 + priority, priority)
    small = _claim_steps(queue, at=T0 + 10**6)
    for priority in (HIGH, NORMAL, LOW):
        _bulk_queue(queue.path, 10_000, T0 + 1000 + priority, priority)
    large = _claim_steps(queue, at=T0 + 10**6)
    assert large <= 2 * small + 5, (small, large)


# -- the claim order as a property ---------------------------------------------------------

JOBS = st.lists(st.tuples(st.sampled_from((CRITICAL, HIGH, NORMAL, LOW)),
                          st.integers(0, 80)),                     # (priority, due offset)
                min_size=1, max_size=25)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs=JOBS, age_s=st.sampled_from((0.0, 10.0, 25.0)), at_offset=st.integers(0, 100),
       limit=st.integers(1, 30), priorities=st.sampled_from(
           ((0, 1, 2, 3), (0, 1, 2), (0, 1), (2, 3), (3,))))
def test_a_claim_takes_the_best_jobs_by_aged_priority(jobs, age_s, at_offset, limit,
                                                      priorities):
    """Whatever is queued, a claim takes exactly the first `limit` due jobs of the allowed
    own priorities ordered by (aged priority, due time, id): none whose aged priority is
    better is left behind, and the order is the merged one."""
    with tempfile.TemporaryDirectory() as directory, \
            litequeue.Queue(os.path.join(directory, "q.db")) as queue:
        with frozen(T0):
            ids = queue.enqueue_many([{"task": "echo", "priority": priority, "delay": due}
                                      for priority, due in jobs])
        at = T0 + at_offset
        due = [(job_id, priority, T0 + offset)
               for job_id, (priority, offset) in zip(ids, jobs)
               if T0 + offset <= at and priority in priorities]
        expected = [job_id for job_id, priority, due_at in sorted(
            due, key=lambda j: (aged_priority(j[1], at - j[2], age_s), j[2], j[0]))]
        assert claimed_ids(queue, at, age_s=age_s, limit=limit,
                           priorities=priorities) == expected[:limit]


# -- a real supervisor ---------------------------------------------------------------------

HIGH_JOBS, HIGH_JOB_S = 20, 0.25


def started_order(db, age):
    """A low job queued first, then a backlog of high ones, through `serve --burst --slots 1
    --age AGE`: the jobs in the order they started."""
    with litequeue.Queue(db) as queue:
        low = queue.enqueue("sleep", {"seconds": 0.01}, priority="low")
        highs = queue.enqueue_many([{"task": "sleep", "payload": {"seconds": HIGH_JOB_S},
                                     "priority": "high"} for _ in range(HIGH_JOBS)])
    result = run_cli("serve", "--burst", "--slots", "1", "--age", age, "--poll", "0.05",
                     db=db, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    with litequeue.Queue(db) as queue:
        jobs = [queue.get(job_id) for job_id in [low, *highs]]
    assert {job.state for job in jobs} == {"done"}
    order = [job.id for job in sorted(jobs, key=lambda job: job.started_at)]
    return order.index(low), len(order)


def test_serve_runs_an_aged_low_job_before_the_high_backlog_is_drained(tmp_path):
    # 20 high jobs of 0.25 s take 5 s or more; with --age 1s the low job is claimed as high
    # once it has waited 2 s, and it is then the oldest high job.
    position, count = started_order(tmp_path / "aged.db", "1s")
    assert position < count - 5, (position, count)
    # With aging off it waits for the last high job.
    position, count = started_order(tmp_path / "off.db", "0")
    assert position == count - 1


def test_serve_refuses_a_bad_age_with_exit_2(tmp_path):
    db = tmp_path / "q.db"
    for age in ("soon", "-5m", "nan"):
        result = run_cli("serve", "--burst", "--age", age, db=db, timeout=30)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "--age" in result.stderr
        assert "Traceback" not in result.stderr
    assert not db.exists(), "bad input must not create the database file"


def test_the_supervisor_ages_by_default_and_age_0_turns_it_off():
    assert litequeue.SupervisorOptions().age_s == 600.0                 # SPEC: 10m
    assert litequeue.SupervisorOptions(age="2m").age_s == 120.0
    assert litequeue.SupervisorOptions(age="0").age_s == 0.0
    with pytest.raises(litequeue.BadInput, match="--age"):
        litequeue.SupervisorOptions(age="-1s")


def test_serve_help_describes_age():
    from click.testing import CliRunner
    result = CliRunner().invoke(litequeue._build_cli(), ["serve", "--help"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0
    assert "--age DURATION" in text and "[default: 10m]" in text
    assert "by its own priority" in text


def test_the_claim_event_says_a_job_was_aged(queue):
    """Why a low job ran before high ones shows in its events, not only in its due time."""
    low = enqueue_at(queue, T0, priority="low")
    high = enqueue_at(queue, T0 + 2 * AGE, priority="high")
    assert claim_all(queue, T0 + 2 * AGE, age_s=AGE) == [low, high]
    (aged,) = [e for e in queue.events(job_id=low) if e["to_state"] == "running"]
    assert aged["reason"].endswith("(aged: low started as high)"), aged
    (plain,) = [e for e in queue.events(job_id=high) if e["to_state"] == "running"]
    assert "aged" not in plain["reason"]
