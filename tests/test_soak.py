"""A kill -9 soak (the crash-safety promise, end to end): 20 rounds of a real
`python litequeue.py serve`, 4 real producer processes enqueueing bursts into the same file,
and SIGKILL at random moments: the supervisor every round, and in some rounds one of its job
children or a producer too. Then `serve --burst` drains the file.

Every round, once its supervisor serves, nothing is left `running` under a dead owner.
What must hold afterwards: every job any enqueue call returned an id for is `done` (a producer
writes each id to its own file, flushed, as soon as the call returns: only those count as
returned), every other job a killed producer may have committed is `done` too, nothing is
`running`, a chunked job resumed from its checkpoints still computes the right sum, no process
printed a traceback, `PRAGMA integrity_check` is ok and `status --json` parses.

The random seed is in every failure message; LITEQUEUE_SOAK_SEED=N replays a run's choices
(the timing of the processes themselves is, of course, not replayed)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import psutil

import litequeue
from conftest import SCRIPT, integrity_ok, job_states, run_cli, start_serve, wait_for, write_app

ROUNDS = 20
PRODUCERS = 4
CHILD_KILL_ROUNDS = 5          # rounds that also SIGKILL one of the supervisor's job children
PRODUCER_KILL_ROUNDS = 4       # rounds that also SIGKILL one producer in the middle of its burst
EARLY_KILL_ROUNDS = 5          # rounds that kill the supervisor at a random moment of its start
DRAIN_RUNS = 8                 # `serve --burst` runs allowed for the final drain

# A crash (kill -9 of a supervisor or of a child) charges the running job an attempt, by
# design: a recovery is charged so that a job that keeps killing its supervisor ends `dead`
# instead of looping. Over 20 rounds of kills one job can be hit several times, and this soak
# checks that nothing is lost, not the retry budget: hence 100 attempts.
APP = """
    @queue.task(max_attempts=100)
    def noop(ctx, n=0):
        return {"n": n}

    @queue.task(max_attempts=100)
    def short(ctx, ms=20):
        time.sleep(ms / 1000)
        return {"ms": ms}

    @queue.task(max_attempts=100)
    def chunked(ctx, chunks=5, chunk_ms=30):
        state = ctx.checkpoint or {"i": 0, "sum": 0}
        while state["i"] < chunks:
            time.sleep(chunk_ms / 1000)
            state = {"i": state["i"] + 1, "sum": state["sum"] + state["i"]}
            yield state                     # a durable checkpoint, and a place to be stopped
        return {"sum": state["sum"], "chunks": chunks}
"""

# A producer: the app imported as a user's code would, a burst of enqueues (one at a time, a
# batch with enqueue_many, and sometimes one through the CLI as cron would), each returned id
# appended to its own file and flushed before the next call.
PRODUCER = """
import json, random, subprocess, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {app_dir!r})
import soak_tasks as app

ids_path, count, seed, use_cli = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)


def a_job():
    roll = rng.random()
    if roll < 0.45:
        return ("noop", {{"n": rng.randrange(1000)}})
    if roll < 0.75:
        return ("short", {{"ms": rng.randint(10, 60)}})
    return ("chunked", {{"chunks": rng.randint(3, 8), "chunk_ms": rng.randint(20, 50)}})


with open(ids_path, "a") as ids:
    def record(*job_ids):
        ids.write("".join(f"{{job_id}}\\n" for job_id in job_ids))
        ids.flush()

    made = 0
    if use_cli == "1":
        task, payload = a_job()
        out = subprocess.run([sys.executable, {script!r}, "enqueue", task, "--payload",
                              json.dumps(payload), "--db", {db!r}],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            sys.exit(f"CLI enqueue exited {{out.returncode}}: {{out.stderr}}")
        record(int(out.stdout))
        made += 1
    while made < count:
        if rng.random() < 0.2:
            batch = [a_job() for _ in range(min(3, count - made))]
            record(*app.queue.enqueue_many(batch))
            made += len(batch)
        else:
            task, payload = a_job()
            record(app.queue.enqueue(task, payload))
            made += 1
        time.sleep(rng.uniform(0, 0.05))
"""

# The breaker is not under test: children killed from outside are crashes, and a few in a
# minute would open a task's breaker and hold its jobs for a 30 s cooldown.
SERVE_ARGS = ("--slots", "2", "--poll", "0.05", "--breaker-failures", "1000",
              "--log-level", "warning")


def owner_pid(owner):
    """The pid in a supervisor id ("host:pid:random")."""
    return int(owner.rsplit(":", 2)[1])


def job_children(pid):
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


def kill_group(proc):
    """SIGKILL a producer and whatever it started (its CLI enqueue): it leads its session."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


class Soak:
    """The file, the app, the random choices, and what happened (for failure messages)."""

    def __init__(self, tmp_path, seed):
        self.tmp_path, self.seed, self.rng = tmp_path, seed, random.Random(seed)
        self.db = str(tmp_path / "soak.db")
        self.env = {"LITEQUEUE_DB": self.db}
        self.app = write_app(tmp_path, APP, name="soak_tasks.py")
        self.producer_script = tmp_path / "producer.py"
        self.producer_script.write_text(PRODUCER.format(
            root=os.path.dirname(SCRIPT), app_dir=str(tmp_path), script=SCRIPT, db=self.db))
        self.observer = litequeue.Queue(self.db)
        self.id_files, self.problems, self.children_killed = [], [], 0
        self.log = [f"seed {seed} (replay with LITEQUEUE_SOAK_SEED={seed})"]

    def context(self):
        return "\n".join(self.log[:1] + self.log[-40:])

    def wait(self, predicate, timeout):
        try:
            return wait_for(predicate, timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.context()}") from None

    # -- one round ----------------------------------------------------------------------

    def round(self, round_no, extra, early):
        """Start a supervisor and 4 producers; SIGKILL the supervisor at a random moment,
        and first a job child or a producer if `extra` says so."""
        note = [f"round {round_no}:"]
        # Odd rounds reuse children (--jobs-per-child): a kill then also lands on idle ones.
        pooled = ("--jobs-per-child", "4") if round_no % 2 else ()
        sup = start_serve("--app", self.app, *SERVE_ARGS, *pooled, db=self.db, env=self.env)
        t0 = time.monotonic()
        producers = self.start_producers(round_no)
        killed_producer, sup_err = None, None
        try:
            if extra == "producer":
                killed_producer = self.kill_a_producer(producers, t0, note)
            if early:           # anywhere in its start: import, register, recover, first claim
                time.sleep(max(0.0, t0 + self.rng.uniform(0.0, 0.6) - time.monotonic()))
            else:
                self.wait(lambda: sup.poll() is not None or self.serving(sup), timeout=30)
                # Nothing is left running under a dead owner once a supervisor serves.
                self.wait(lambda: sup.poll() is not None or all(
                    owner_pid(job.owner) == sup.pid for job in self.running()), timeout=20)
                if extra == "child":
                    self.kill_a_child(sup, t0, note)
                time.sleep(self.rng.uniform(0.0, 0.6))
            if sup.poll() is not None:
                sup_err = sup.communicate(timeout=30)[1]
                raise AssertionError(f"supervisor exited by itself ({sup.returncode}):\n"
                                     f"{sup_err[-3000:]}\n{self.context()}")
            sup.send_signal(signal.SIGKILL)
            note.append(f"supervisor killed at {time.monotonic() - t0:.2f}s")
        finally:
            if sup.poll() is None:
                sup.kill()
            if sup_err is None:
                # Reaped before the next supervisor starts: a zombie's pid still looks alive
                # (as it would to systemd, which reaps its service at once).
                sup_err = sup.communicate(timeout=30)[1]
            if "Traceback" in sup_err:
                self.problems.append(f"supervisor of round {round_no}:\n{sup_err[-3000:]}")
            self.finish_producers(round_no, producers, killed_producer)
            self.log.append(" ".join(note))

    def start_producers(self, round_no):
        rng = self.rng
        cli_producer = rng.randrange(PRODUCERS) if rng.random() < 0.5 else None
        producers = []
        for index in range(PRODUCERS):
            ids_path = str(self.tmp_path / f"ids-{round_no}-{index}.txt")
            self.id_files.append(ids_path)
            producers.append(subprocess.Popen(
                [sys.executable, str(self.producer_script), ids_path, str(rng.randint(2, 5)),
                 str(rng.randrange(1 << 32)), "1" if index == cli_producer else "0"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={**os.environ, **self.env}, start_new_session=True))
        return producers

    def kill_a_producer(self, producers, t0, note):
        victim = self.rng.randrange(PRODUCERS)
        time.sleep(self.rng.uniform(0.05, 0.5))
        if producers[victim].poll() is None and kill_group(producers[victim]):
            note.append(f"producer {victim} killed at {time.monotonic() - t0:.2f}s")
            return victim
        note.append(f"producer {victim} had already finished")
        return None

    def kill_a_child(self, sup, t0, note):
        time.sleep(self.rng.uniform(0.0, 0.3))
        # A job child, unless the supervisor is gone (the caller reports it) or every job
        # is already done (jobs this short may all be, with nothing left to kill).
        children = self.wait(lambda: job_children(sup.pid) or sup.poll() is not None
                             or self.nothing_to_run(), timeout=20)
        if children is True:
            note.append("no job child to kill: nothing left to run")
            return
        victim = self.rng.choice(sorted(children, key=lambda p: p.pid))
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            note.append(f"child {victim.pid} had already ended")
            return
        self.children_killed += 1
        note.append(f"child {victim.pid} killed at {time.monotonic() - t0:.2f}s")

    def finish_producers(self, round_no, producers, killed):
        for index, proc in enumerate(producers):
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                _, err = proc.communicate(timeout=10)
                self.problems.append(f"producer {index} of round {round_no} hung")
            if index != killed and proc.returncode != 0:
                self.problems.append(f"producer {index} of round {round_no} exited "
                                     f"{proc.returncode}:\n{err[-3000:]}")

    # -- the drain ----------------------------------------------------------------------

    def drain(self):
        """`serve --burst` until nothing is queued. Jobs whose child was killed under a live
        supervisor failed and back off before their retry (1 s doubling per attempt, not
        settable), and `serve --burst` exits when nothing is due: so it runs again once a
        job is due, a bounded number of times."""
        for drain in range(DRAIN_RUNS):
            result = run_cli("serve", "--burst", "--app", self.app, *SERVE_ARGS, db=self.db,
                             env=self.env, timeout=120)
            assert result.returncode == 0, (f"serve --burst: {result.stderr[-3000:]}\n"
                                            f"{self.context()}")
            if "Traceback" in result.stderr:
                self.problems.append(f"serve --burst:\n{result.stderr[-3000:]}")
            counts = self.observer.stats()["jobs"]
            self.log.append(f"drain {drain}: {counts}")
            if counts["queued"] == 0 and counts["running"] == 0:
                return
            assert counts["running"] == 0, f"running after serve --burst\n{self.context()}"
            next_due_at = min(job.due_at for job in self.observer.jobs(state="queued",
                                                                       limit=None))
            assert next_due_at - litequeue.now() < 40, (
                f"next job due in {next_due_at - litequeue.now():.0f}s\n{self.context()}")
            self.wait(self.observer.has_due, timeout=45)

    # -- reading the file ---------------------------------------------------------------

    def nothing_to_run(self):
        counts = self.observer.stats()["jobs"]
        return counts["queued"] + counts["running"] == 0

    def serving(self, sup):
        return any(s["pid"] == sup.pid for s in self.observer.live_supervisors())

    def running(self):
        return self.observer.jobs(state="running", limit=None)

    def returned_ids(self):
        """Ids whose line was written whole: a producer killed mid-write returned no more."""
        ids = []
        for path in self.id_files:
            if os.path.exists(path):
                with open(path) as f:
                    ids += [int(line) for line in f.read().split("\n")[:-1]]
        return ids


def test_kill_9_soak_loses_no_job(tmp_path):
    seed = int(os.environ.get("LITEQUEUE_SOAK_SEED", random.randrange(1 << 32)))
    soak = Soak(tmp_path, seed)
    extras = (["child"] * CHILD_KILL_ROUNDS + ["producer"] * PRODUCER_KILL_ROUNDS
              + [None] * (ROUNDS - CHILD_KILL_ROUNDS - PRODUCER_KILL_ROUNDS))
    soak.rng.shuffle(extras)
    # An early kill may come before any job runs: not in a round meant to kill a child too.
    early = set(soak.rng.sample([r for r in range(ROUNDS) if extras[r] != "child"],
                                EARLY_KILL_ROUNDS))
    started = time.monotonic()
    try:
        for round_no in range(ROUNDS):
            soak.round(round_no, extras[round_no], round_no in early)
        soak.log.append(f"{ROUNDS} rounds in {time.monotonic() - started:.1f}s, "
                        f"{soak.children_killed} children killed, before the drain: "
                        f"{soak.observer.stats()['jobs']}")
        soak.drain()
        jobs = soak.observer.jobs(limit=None)
        live = soak.observer.live_supervisors()
    finally:
        soak.observer.close()
    resumed = sum(1 for job in jobs if job.task == "chunked" and job.attempts > 1)
    soak.log.append(f"total {time.monotonic() - started:.1f}s; "
                    f"{sum(job.recoveries for job in jobs)} recoveries, {resumed} chunked jobs "
                    f"run more than once, most attempts {max(job.attempts for job in jobs)}")
    print("\n".join(soak.log))                 # shown by pytest -s, and on a failure
    context = soak.context()

    assert not soak.problems, "\n\n".join(soak.problems) + "\n" + context
    states = job_states(soak.db)
    returned = soak.returned_ids()
    assert len(returned) > ROUNDS * PRODUCERS, context
    assert len(set(returned)) == len(returned), f"an id returned twice\n{context}"
    missing = [job_id for job_id in returned if job_id not in states]
    assert not missing, f"returned ids with no job: {missing[:20]}\n{context}"
    not_done = {job_id: states[job_id] for job_id in returned if states[job_id] != "done"}
    assert not not_done, f"returned jobs not done: {dict(list(not_done.items())[:20])}\n{context}"
    # Jobs a killed producer committed but had not recorded yet must not be lost either.
    others = {job_id: state for job_id, state in states.items() if state != "done"}
    assert not others, f"jobs not done: {dict(list(others.items())[:20])}\n{context}"
    assert not [job.id for job in jobs if job.state == "running"], context
    assert live == [], f"dead supervisors still listed: {live}\n{context}"
    for job in jobs:
        if job.task == "chunked":
            chunks = job.payload["chunks"]
            assert job.result == {"sum": chunks * (chunks - 1) // 2, "chunks": chunks}, (
                f"job {job.id} resumed wrongly: {job.result} (checkpoint {job.checkpoint})"
                f"\n{context}")
    # The kills landed while jobs ran: the soak exercised recovery, not just restarts.
    assert sum(job.recoveries for job in jobs) > 0, context
    assert soak.children_killed > 0, context

    assert integrity_ok(soak.db), context
    status = run_cli("status", "--json", db=soak.db)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["jobs"]["done"] == len(states), f"{report['jobs']}\n{context}"
    assert report["jobs"]["queued"] == report["jobs"]["running"] == 0, context
