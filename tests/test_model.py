"""The Queue API against a small pure-Python model (issue 6): a hypothesis state machine
enqueues, claims, completes, fails, requeues, cancels, retries, expires, sheds and purges in
any order on a real SQLite file, and after every step the file must hold exactly the jobs,
states, attempts, owners and counts the model says, and claims must come out in its order.

The model is written from SPEC.md (and, where the spec is silent, from the Queue docstrings);
it never asks the Queue what to expect. One value is observed instead of predicted: the
jittered backoff of a failed job, which is random by design. The model checks it lies in the
documented window and then adopts it, so the order of later claims is still exact.

Time: claim, expire, shed_due and purge take `at=`, and get the model clock. enqueue,
enqueue_many, complete, fail, requeue, cancel and retry read litequeue.now() themselves, so
freezegun holds time.time() at the same model clock for the whole example (started in
__init__, stopped in teardown) and the "advance clock" rule moves both together: delays,
backoff and TTLs then fall exactly where the model puts them.
"""

import datetime
import os
import shutil
import tempfile

from freezegun import freeze_time
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import litequeue
from litequeue import (BadInput, BadPriority, BreakerPolicy, Error, InvalidState,
                       JobNotFound, LeaseLost, Queue, QueueFull)

T0 = 1_700_000_000.0      # the model clock starts here; every step is a multiple of 0.25 s
QUEUED, RUNNING, DONE, DEAD, CANCELLED, SKIPPED = litequeue.STATES
STATES = litequeue.STATES
FINAL = (DONE, DEAD, CANCELLED, SKIPPED)
PRIORITY_VALUES = {"critical": 0, "high": 1, "normal": 2, "low": 3, "HIGH": 1,
                   0: 0, 1: 1, 2: 2, 3: 3}
PRIORITY_NAMES = {0: "critical", 1: "high", 2: "normal", 3: "low"}
EPS = 1e-6


class Defaults:
    """What the model expects a task's jobs to get when enqueue does not say."""

    def __init__(self, priority, max_attempts, ttl_s=None, shed=False, unique=False):
        self.priority, self.max_attempts = priority, max_attempts
        self.ttl_s, self.shed, self.unique = ttl_s, shed, unique


TASKS = {
    "a": Defaults(2, 3),                            # in no catalogue: the global defaults
    "urgent": Defaults(0, 2, ttl_s=50.0),           # registered by the machine (below)
    "heartbeat": Defaults(3, 1, ttl_s=300.0, shed=True, unique=True),   # built-in
    "chunked": Defaults(3, 3),                      # built-in demo, low but not shed
}
TASK_NAMES = sorted(TASKS)
OWNERS = ("w1", "w2")
ALL_PRIORITIES = (0, 1, 2, 3)
PICKS = st.integers(0, 255)                 # which job (modulo the candidates)
JOB_PICKS = st.integers(-1, 255)            # -1: a job id that names no job

# -- strategies -------------------------------------------------------------------------

job_items = st.fixed_dictionaries(
    {"task": st.sampled_from(TASK_NAMES),
     # None: the task's default. "a" is also the key unique=True gives task "a": one
     # namespace of keys. Few keys, so that they collide.
     "unique": st.sampled_from([None, None, False, True, "k1", "k1", "k2", "a"])},
    optional={
        "payload": st.sampled_from([None, {"n": 1}, [1, "x"], "text"]),
        "priority": st.sampled_from(sorted(PRIORITY_VALUES, key=str)),
        "delay": st.sampled_from([0, 1, 5.5, 60]),
        "ttl": st.sampled_from([1, 10, 100]),
        "max_attempts": st.integers(1, 3),
    })
batch_items = st.one_of(job_items, st.sampled_from(TASK_NAMES))   # a bare name is a job too


def utc(at):
    return datetime.datetime.fromtimestamp(at, datetime.timezone.utc)


def close(a, b):
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= EPS


# -- the model --------------------------------------------------------------------------

class ModelJob:
    __slots__ = ("id", "task", "payload", "priority", "state", "unique_key", "attempts",
                 "max_attempts", "shed", "ttl_s", "due_at", "expires_at", "finished_at",
                 "owner", "cancel_requested", "preemptions", "recoveries", "error", "result",
                 "checkpoint")

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields.get(name))

    def finish(self, state, at, error):
        """Into a final state: no owner, finished now, the error (or reason) recorded."""
        self.state, self.finished_at, self.owner = state, at, None
        if error is not None:
            self.error = error


class Model:
    """Jobs as the spec says they should be. No SQL, no litequeue calls."""

    def __init__(self):
        self.jobs = {}
        self.max_depth = 0               # 0: unbounded, the default of a new file

    def in_state(self, state):
        return sorted(job.id for job in self.jobs.values() if job.state == state)

    def new_job(self, item, at):
        """The job an enqueue item makes (no id yet)."""
        task = item["task"]
        defaults = TASKS[task]
        unique = item.get("unique")
        if unique is None:
            key = task if defaults.unique else None
        elif unique is False:
            key = None
        else:
            key = task if unique is True else unique
        priority = item.get("priority")
        priority = defaults.priority if priority is None else PRIORITY_VALUES[priority]
        ttl_s = defaults.ttl_s if item.get("ttl") is None else float(item["ttl"])
        due_at = at + float(item.get("delay") or 0)
        max_attempts = item.get("max_attempts") or defaults.max_attempts
        return ModelJob(task=task, payload=item.get("payload"), priority=priority, state=QUEUED,
                        unique_key=key, attempts=0, max_attempts=max_attempts,
                        shed=defaults.shed, ttl_s=ttl_s, due_at=due_at,
                        expires_at=None if ttl_s is None else due_at + ttl_s,
                        cancel_requested=False, preemptions=0, recoveries=0)

    def holder(self, key, at, expiring):
        """The id of the queued or running job holding key. A waiting holder whose TTL ran out
        no longer holds it: it is added to `expiring` (it becomes skipped if the call goes
        through)."""
        if key is None:
            return None
        for job in self.jobs.values():
            if job.unique_key != key or job.state not in (QUEUED, RUNNING):
                continue
            if job.id in expiring:
                continue
            if job.state == QUEUED and job.expires_at is not None and job.expires_at <= at:
                expiring.add(job.id)
                continue
            return job.id
        return None

    def plan_enqueue(self, items, at):
        """What enqueue_many(items) should do: (expiring holders, per item ("existing", id)
        or ("new", index into new jobs), new jobs, full?)."""
        expiring, plan, new, first_with_key = set(), [], [], {}
        for item in items:
            job = self.new_job(item, at)
            existing = self.holder(job.unique_key, at, expiring)
            if existing is not None:
                plan.append(("existing", existing))
            elif job.unique_key is not None and job.unique_key in first_with_key:
                plan.append(("new", first_with_key[job.unique_key]))   # same key twice in a batch
            else:
                if job.unique_key is not None:
                    first_with_key[job.unique_key] = len(new)
                plan.append(("new", len(new)))
                new.append(job)
        # max_depth counts every queued job (delayed and backing-off ones too); a duplicate
        # writes nothing and so never counts or raises. The batch is all or nothing.
        queued = len(self.in_state(QUEUED)) - len(expiring)
        full = bool(new) and self.max_depth > 0 and queued + len(new) > self.max_depth
        return expiring, plan, new, full

    def expire_holders(self, expiring, at):
        for job_id in expiring:
            self.jobs[job_id].finish(SKIPPED, at, "expired")

    def claim_order(self, at, priorities, tasks):
        """Due, unexpired queued jobs a claimer may take: priority, then due time, then id."""
        due = [job for job in self.jobs.values()
               if job.state == QUEUED and job.priority in priorities
               and (tasks is None or job.task in tasks) and job.due_at <= at
               and (job.expires_at is None or job.expires_at > at)]
        return sorted(due, key=lambda job: (job.priority, job.due_at, job.id))


# -- the machine ------------------------------------------------------------------------

class QueueMachine(RuleBasedStateMachine):
    """A real Queue on a fresh file beside the model; every rule does the same to both."""

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="lq-model-")
        self.path = os.path.join(self.dir, "q.db")
        self.clock = T0
        self.freezer = freeze_time(utc(T0))
        self.frozen = self.freezer.start()
        self.model = Model()
        self.queue = None
        self.window = Queue.CLAIM_WINDOW
        self.leases = []            # every (job id, owner, attempt) a claim handed out

    def teardown(self):
        try:
            if self.queue is not None:
                assert self.queue.conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
                self.queue.close()
        finally:
            self.freezer.stop()
            shutil.rmtree(self.dir, ignore_errors=True)

    def open_queue(self, max_depth):
        # The breaker is the one piece of claim() the model leaves out (tests/test_breaker.py
        # covers it): a threshold no example reaches keeps every task's breaker closed, while
        # fail() still runs its breaker bookkeeping.
        # durable=False (synchronous=NORMAL) spares an fsync per step; nothing here is about
        # power loss.
        queue = Queue(self.path, max_depth=max_depth, durable=False,
                      breaker=BreakerPolicy(failures=2 ** 31 - 1))
        # claim() reads CLAIM_WINDOW through self: a small window sends claims down the seek
        # path (the window holds only jobs it may not take) with a handful of jobs.
        queue.CLAIM_WINDOW = self.window
        return queue

    @initialize(max_depth=st.sampled_from([None, 0, 3, 6]), window=st.sampled_from([2, 64]))
    def start(self, max_depth, window):
        self.window = window
        self.queue = self.open_queue(max_depth)
        # The demo tasks' declarations, as `serve` without --app stores them (a new file's
        # catalogue holds only heartbeat); the model knows their defaults.
        litequeue.builtin_tasks(self.queue, demos=True)

        @self.queue.task(name="urgent", priority="critical", max_attempts=2, ttl=50)
        def urgent(ctx):
            return None

        if max_depth is not None:
            self.model.max_depth = max_depth

    # -- helpers ------------------------------------------------------------------------

    def job_ids(self):
        return sorted(self.model.jobs)

    def running(self):
        return self.model.in_state(RUNNING)

    # Rules pick jobs by an integer (an index into the model's list) rather than with
    # st.data(), so that the steps hypothesis prints for a failure run as they are.

    def pick_job(self, pick, among):
        """A job id: of a job in one of the states `among` (any job when there is none, or
        when among is None); pick -1 (or an empty file) names no job."""
        ids = self.job_ids()
        if pick < 0 or not ids:
            return (max(ids) if ids else 0) + 1000
        some = [i for i in ids if among is not None and self.model.jobs[i].state in among]
        return (some or ids)[pick % len(some or ids)]

    def pick_lease(self, pick):
        job = self.model.jobs[self.running()[pick % len(self.running())]]
        return job, (job.id, job.owner, job.attempts)

    def adopt_new_ids(self, ids, plan, new, expiring):
        """Check the ids enqueue returned against the plan; add the new jobs to the model."""
        assert len(ids) == len(plan)
        first_new = {}
        for returned, (kind, value) in zip(ids, plan):
            if kind == "existing":
                assert returned == value, "a duplicate unique enqueue returns the holder's id"
            elif value in first_new:
                assert returned == first_new[value], "one key twice in a batch: one job"
            else:
                # FIFO within a priority needs a new job's id above every id in the file.
                assert returned not in self.model.jobs
                assert all(returned > other for other in self.model.jobs)
                assert all(returned > other for other in first_new.values())
                first_new[value] = returned
        self.model.expire_holders(expiring, self.clock)
        for index, job_id in first_new.items():
            new[index].id = job_id
            self.model.jobs[job_id] = new[index]

    # -- producers ----------------------------------------------------------------------

    @rule(item=job_items)
    def enqueue(self, item):
        expiring, plan, new, full = self.model.plan_enqueue([item], self.clock)
        if full:
            try:
                self.queue.enqueue(**item)
            except QueueFull:
                return
            raise AssertionError("enqueue past max_depth did not raise QueueFull")
        job_id = self.queue.enqueue(**item)
        self.adopt_new_ids([job_id], plan, new, expiring)

    @rule(items=st.lists(batch_items, min_size=1, max_size=4))
    def enqueue_many(self, items):
        as_dicts = [{"task": item} if isinstance(item, str) else item for item in items]
        expiring, plan, new, full = self.model.plan_enqueue(as_dicts, self.clock)
        if full:
            try:
                self.queue.enqueue_many(items)
            except QueueFull:
                return
            raise AssertionError("enqueue_many past max_depth did not raise QueueFull")
        ids = self.queue.enqueue_many(items)
        self.adopt_new_ids(ids, plan, new, expiring)

    @rule(call=st.sampled_from(["priority", "max_attempts", "set_max_depth", "open", "get"]),
          value=st.sampled_from([-1, 2.5, True, "urgentest", "3"]))
    def bad_input(self, call, value):
        """Bad input raises a BadInput (of the Error tree) and writes nothing: the invariant
        then finds the file as the model left it (an expired holder of k1 included)."""
        calls = {
            "priority": (BadPriority, lambda: self.queue.enqueue("a", priority=value,
                                                                 unique="k1")),
            "max_attempts": (BadInput, lambda: self.queue.enqueue("a", max_attempts=value,
                                                                  unique="k1")),
            "set_max_depth": (BadInput, lambda: self.queue.set_max_depth(value)),
            "open": (BadInput, lambda: Queue(self.path, max_depth=value).close()),
            "get": (JobNotFound, lambda: self.queue.get(max(self.model.jobs, default=0) + 1)),
        }
        expected, call_it = calls[call]
        try:
            call_it()
        except expected as exc:
            assert isinstance(exc, Error)
            return
        raise AssertionError(f"{call} with {value!r} was accepted")

    # -- the worker side ----------------------------------------------------------------

    @rule(owner=st.sampled_from(OWNERS), limit=st.integers(1, 3), pass_at=st.booleans())
    def claim(self, owner, limit, pass_at):
        """A supervisor serving every task at the normal memory level."""
        self.claim_as(owner, limit, ALL_PRIORITIES, None, pass_at)

    @rule(owner=st.sampled_from(OWNERS), limit=st.integers(1, 3),
          priorities=st.sampled_from([ALL_PRIORITIES, (0, 1), (2, 3), (3,)]),
          tasks=st.sampled_from([None, (), ("a",), ("a", "urgent"), ("chunked", "heartbeat")]))
    def claim_some(self, owner, limit, priorities, tasks):
        """A claimer limited by memory level (priorities) or by the tasks it serves."""
        self.claim_as(owner, limit, priorities, tasks, True)

    def claim_as(self, owner, limit, priorities, tasks, pass_at):
        expected = self.model.claim_order(self.clock, priorities, tasks)[:limit]
        claimed = self.queue.claim(owner, tasks=tasks, priorities=priorities, limit=limit,
                                   at=self.clock if pass_at else None)
        assert [job.id for job in claimed] == [job.id for job in expected], \
            "claims must come out by priority, then due time, then id"
        for got, job in zip(claimed, expected):
            job.state, job.owner, job.attempts = RUNNING, owner, job.attempts + 1
            assert (got.state, got.owner, got.attempts) == (RUNNING, owner, job.attempts)
            self.leases.append((job.id, owner, job.attempts))

    @precondition(lambda self: self.running())
    @rule(pick=PICKS, result=st.sampled_from([None, {"ok": True}, [1, 2]]))
    def complete(self, pick, result):
        job, lease = self.pick_lease(pick)
        assert self.queue.complete(*lease, result=result) is None
        # A task that returns is done, whatever was asked (a cancel included).
        job.finish(DONE, self.clock, None)
        job.error, job.result = None, result

    @precondition(lambda self: self.running())
    @rule(pick=PICKS, retryable=st.booleans(), breaker_failure=st.booleans(),
          error=st.sampled_from(["boom", "Traceback: ValueError"]))
    def fail(self, pick, retryable, breaker_failure, error):
        job, lease = self.pick_lease(pick)
        state = self.queue.fail(*lease, error, retryable=retryable,
                                breaker_failure=breaker_failure)
        if job.cancel_requested:                  # asked to cancel: no retry
            expected = CANCELLED
            job.finish(CANCELLED, self.clock, error)
        elif retryable and job.attempts < job.max_attempts:
            expected = QUEUED
            job.state, job.owner, job.error = QUEUED, None, error
            # Backoff: 1 s doubling per attempt, capped at 5 minutes, with +-20 % jitter
            # (backoff_s's docstring). The jitter is random: check the window, then adopt.
            base = min(300.0, 2.0 ** (job.attempts - 1))
            due_at = self.queue.get(job.id).due_at
            assert self.clock + 0.8 * base - EPS <= due_at <= self.clock + min(300.0, 1.2 * base) + EPS
            # The TTL counts from when the job is due (SPEC): its expiry moves with it.
            if job.expires_at is not None:
                job.expires_at += due_at - job.due_at
            job.due_at = due_at
        else:                                     # attempts used up, or not retryable
            expected = DEAD
            job.finish(DEAD, self.clock, error)
        assert state == expected

    @precondition(lambda self: self.running())
    @rule(pick=PICKS, charge=st.booleans(), preempted=st.booleans(),
          recovered=st.booleans())
    def requeue(self, pick, charge, preempted, recovered):
        job, lease = self.pick_lease(pick)
        state = self.queue.requeue(*lease, "preempted", charge=charge, preempted=preempted,
                                   recovered=recovered)
        if job.cancel_requested:
            expected = CANCELLED
            job.finish(CANCELLED, self.clock, "cancelled")
        elif charge and job.attempts >= job.max_attempts:
            expected = DEAD                       # a job that can never fit ends dead
            job.finish(DEAD, self.clock, "preempted")
        else:                                     # back in line, keeping its due time
            expected = QUEUED
            job.state, job.owner = QUEUED, None
            job.attempts -= 0 if charge else 1
            job.preemptions += int(preempted)
            job.recoveries += int(recovered)
        assert state == expected

    @precondition(lambda self: any(self.model.jobs[i].cancel_requested for i in self.running()))
    @rule(pick=PICKS)
    def finish_cancelled(self, pick):
        ids = [i for i in self.running() if self.model.jobs[i].cancel_requested]
        job = self.model.jobs[ids[pick % len(ids)]]
        self.queue.finish_cancelled(job.id, job.owner, job.attempts)
        job.finish(CANCELLED, self.clock, "cancelled")

    @precondition(lambda self: self.running())
    @rule(pick=PICKS, state=st.sampled_from([{"page": 1}, {"page": 2}, [3]]))
    def save_checkpoint(self, pick, state):
        job, lease = self.pick_lease(pick)
        self.queue.save_checkpoint(*lease, state)
        job.checkpoint = state

    @precondition(lambda self: self.leases)
    @rule(pick=PICKS, call=st.sampled_from(["complete", "fail", "requeue", "save", "cancelled"]),
          tweak=st.sampled_from(["as given", "owner", "attempt -1", "attempt +1"]),
          current=st.booleans())
    def lost_lease(self, pick, call, tweak, current):
        # A lease that is not the job's current one: another owner or attempt of a running
        # job, or an old lease of a job since finished, requeued, cancelled or purged. Every
        # call refuses with LeaseLost and changes nothing.
        if current and self.running():
            _, (job_id, owner, attempt) = self.pick_lease(pick)
        else:
            job_id, owner, attempt = self.leases[pick % len(self.leases)]
        if tweak == "owner":
            owner = "intruder"
        elif tweak != "as given":
            attempt += int(tweak.split()[1])
        job = self.model.jobs.get(job_id)
        if job is not None and (job.state, job.owner, job.attempts) == (RUNNING, owner, attempt):
            attempt += 1                          # it is current: make it one that is not
        calls = {
            "complete": lambda: self.queue.complete(job_id, owner, attempt, {"late": True}),
            "fail": lambda: self.queue.fail(job_id, owner, attempt, "late"),
            "requeue": lambda: self.queue.requeue(job_id, owner, attempt, "late", charge=False),
            "save": lambda: self.queue.save_checkpoint(job_id, owner, attempt, {"late": 1}),
            "cancelled": lambda: self.queue.finish_cancelled(job_id, owner, attempt),
        }
        try:
            calls[call]()
        except LeaseLost as exc:
            assert isinstance(exc, Error)
            return
        raise AssertionError(f"{call} under a lost lease {(job_id, owner, attempt)} went through")

    # -- steering -----------------------------------------------------------------------

    # Most picks name a job the call applies to; the rest any job, or none.
    @rule(pick=JOB_PICKS, among=st.sampled_from([(QUEUED, RUNNING), (RUNNING,), None]))
    def cancel(self, pick, among):
        job_id = self.pick_job(pick, among)
        job = self.model.jobs.get(job_id)
        if job is None:
            expected_error = JobNotFound
        elif job.state in FINAL:
            expected_error = InvalidState
        else:
            expected_error = None
        if expected_error is not None:
            try:
                self.queue.cancel(job_id)
            except expected_error as exc:
                assert isinstance(exc, Error)
                return
            raise AssertionError(f"cancel of job {job_id} did not raise {expected_error}")
        state = self.queue.cancel(job_id)
        if job.state == QUEUED:
            job.finish(CANCELLED, self.clock, "cancelled")
            assert state == CANCELLED
        else:           # running: its supervisor is asked to stop it; it stays running
            job.cancel_requested = True
            assert state == RUNNING

    @rule(pick=JOB_PICKS, among=st.sampled_from([(DEAD, SKIPPED, CANCELLED)] * 2 + [None]))
    def retry(self, pick, among):
        job_id = self.pick_job(pick, among)
        job = self.model.jobs.get(job_id)
        expiring = set()
        if job is None:
            expected_error = JobNotFound
        elif job.state not in (DEAD, SKIPPED, CANCELLED):
            expected_error = InvalidState
        elif self.model.holder(job.unique_key, self.clock, expiring) is not None:
            expected_error = InvalidState         # another active job holds its unique key
        else:
            expected_error = None
        if expected_error is not None:
            try:
                self.queue.retry(job_id)
            except expected_error as exc:
                assert isinstance(exc, Error)
                return
            raise AssertionError(f"retry of job {job_id} did not raise {expected_error}")
        assert self.queue.retry(job_id) == job_id
        self.model.expire_holders(expiring, self.clock)
        # Back to queued, due now, with fresh attempts. Never refused for depth (SPEC: only
        # new enqueues are). Its TTL counts from the moment it is due again (SPEC: "ttl
        # counts from the moment the job is due"), i.e. now + its ttl.
        job.state, job.attempts, job.due_at = QUEUED, 0, self.clock
        job.expires_at = None if job.ttl_s is None else self.clock + job.ttl_s
        job.finished_at, job.cancel_requested = None, False

    @rule(max_depth=st.sampled_from([None, 0, 0, 1, 2, 4, 8]), reopen=st.booleans())
    def set_max_depth(self, max_depth, reopen):
        """set_max_depth(n), or another Queue(path, max_depth=n) on the file."""
        if reopen:
            # A new Queue that registers nothing: max_depth and the task catalogue are
            # properties of the file (None leaves the stored depth as it is), and enqueues
            # by name go on using the stored task defaults.
            self.queue.close()
            self.queue = self.open_queue(max_depth)
        elif max_depth is not None:
            self.queue.set_max_depth(max_depth)
        if max_depth is not None:
            self.model.max_depth = max_depth

    @rule(seconds=st.sampled_from([0.25, 1, 2, 5, 30, 120, 400]))
    def advance_clock(self, seconds):
        self.clock += seconds
        self.frozen.move_to(utc(self.clock))
        assert litequeue.now() == self.clock

    # -- sweeps and housekeeping --------------------------------------------------------

    @rule(kind=st.sampled_from(["expire", "expire", "shed", "purge"]),
          tasks=st.sampled_from([None, None, ("heartbeat",), ("a", "chunked")]),
          older_than=st.sampled_from([0, 5, 100]))
    def housekeeping(self, kind, tasks, older_than):
        """What a supervisor round does besides claiming: expire, shed under memory
        pressure, purge old final jobs (retention)."""
        if kind == "purge":
            cutoff = self.clock - older_than
            gone = [job.id for job in self.model.jobs.values()
                    if job.state in FINAL and job.finished_at < cutoff]
            assert self.queue.purge(older_than, at=self.clock) == len(gone)
            for job_id in gone:
                del self.model.jobs[job_id]
            return
        if kind == "expire":
            # TTL is applied lazily, as litequeue documents: claim never takes an expired
            # job, and expire() (every supervisor round) or a unique-key lookup makes it
            # skipped. Until then it is still queued (and counts toward max_depth).
            expected = [job for job in self.model.jobs.values() if job.state == QUEUED
                        and job.expires_at is not None and job.expires_at <= self.clock]
            skipped = self.queue.expire(at=self.clock)
            reason = "expired"
        else:       # the skip level: due low jobs of shed=True tasks become skipped
            expected = [job for job in self.model.jobs.values() if job.state == QUEUED
                        and job.priority == 3 and job.shed and job.due_at <= self.clock
                        and (tasks is None or job.task in tasks)]
            skipped = self.queue.shed_due(tasks=tasks, at=self.clock)
            reason = "shed under memory pressure"
        assert sorted(skipped) == sorted(job.id for job in expected)
        for job in expected:
            job.finish(SKIPPED, self.clock, reason)

    # -- invariants (one method, so a failure's printed steps stay readable) -----------

    @invariant()
    def file_matches_model(self):
        # Counts by state and by priority.
        # (stats counts a queued job whose TTL ran out as skipped, as the next sweep will
        # store it, without writing: a read never writes.)
        stats = self.queue.stats(at=self.clock)

        def shown(job):
            expired = (job.state == QUEUED and job.expires_at is not None
                       and job.expires_at <= self.clock)
            return SKIPPED if expired else job.state
        by_state = {state: 0 for state in STATES}
        by_priority = {name: {} for name in litequeue.PRIORITIES}
        for job in self.model.jobs.values():
            by_state[shown(job)] += 1
            counts = by_priority[PRIORITY_NAMES[job.priority]]
            counts[shown(job)] = counts.get(shown(job), 0) + 1
        assert stats["jobs"] == by_state
        assert stats["priorities"] == by_priority

        # jobs(state=S) for every S partitions the file: no job in two states, none in none.
        seen = []
        for state in STATES:
            ids = sorted(job.id for job in self.queue.jobs(state=state, limit=None))
            assert ids == self.model.in_state(state), state
            seen += ids
        assert sorted(seen) == self.job_ids()

        # Every job as the model has it.
        rows = {job.id: job for job in self.queue.jobs(limit=None)}
        assert sorted(rows) == self.job_ids()
        for job_id, want in self.model.jobs.items():
            got = rows[job_id]
            assert (got.task, got.state, got.attempts, got.owner, got.priority) == (
                want.task, want.state, want.attempts, want.owner,
                PRIORITY_NAMES[want.priority]), job_id
            assert (got.unique_key, got.max_attempts, got.shed, got.cancel_requested) == (
                want.unique_key, want.max_attempts, want.shed, want.cancel_requested), job_id
            assert (got.preemptions, got.recoveries, got.error) == (
                want.preemptions, want.recoveries, want.error), job_id
            assert (got.payload, got.result, got.checkpoint) == (
                want.payload, want.result, want.checkpoint), job_id
            assert close(got.due_at, want.due_at), (job_id, "due_at", got.due_at, want.due_at)
            assert close(got.expires_at, want.expires_at), (
                job_id, "expires_at", got.expires_at, want.expires_at)
            assert close(got.finished_at, want.finished_at), (
                job_id, "finished_at", got.finished_at, want.finished_at)

        # At most one queued or running job per unique key, read off the file itself.
        keys = [job.unique_key for job in rows.values()
                if job.unique_key is not None and job.state in (QUEUED, RUNNING)]
        assert len(keys) == len(set(keys))

        assert self.queue.max_depth == self.model.max_depth


QueueMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow])
TestQueueModel = QueueMachine.TestCase


def test_retry_after_a_backoff_gives_the_job_its_whole_ttl():
    """A failing example the machine found, replayed every run: a job with a TTL fails
    once (backing off moves its due time), is cancelled, and is retried by hand. Due again
    now, its TTL must count from now (/tmp/lq_bugs/model-1.md)."""
    state = QueueMachine()
    try:
        state.start(max_depth=None, window=64)
        state.enqueue(item={"task": "urgent"})                 # critical, ttl 50, 2 attempts
        state.claim(owner="w1", limit=1, pass_at=True)
        state.fail(pick=0, retryable=True, breaker_failure=True, error="boom")
        state.file_matches_model()
        state.cancel(pick=0, among=None)
        state.advance_clock(seconds=5)
        state.file_matches_model()
        state.retry(pick=0, among=None)
        state.file_matches_model()
    finally:
        state.teardown()
