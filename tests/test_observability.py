"""Observability: the pressure history a supervisor records, and the Prometheus metrics
(`Queue.metrics_text()`, `litequeue metrics`), read back with Prometheus's own parser."""

import os
import signal
import stat

import pytest

import litequeue
from conftest import run_cli, start_serve, wait_for

parser = pytest.importorskip("prometheus_client.parser")

FAMILIES = {                        # family name (as the parser names it): type
    "litequeue_jobs": "gauge",
    "litequeue_memory_pressure_ratio": "gauge",
    "litequeue_memory_level": "gauge",
    "litequeue_breaker_open": "gauge",
    "litequeue_heartbeat_age_seconds": "gauge",
    "litequeue_oldest_queued_age_seconds": "gauge",
    "litequeue_jobs_finished": "counter",       # the parser drops a counter's _total
}


class ScriptedPressure:
    def __init__(self, pressure=10.0):
        self.pressure = pressure
        self.budget_bytes = None

    def machine_percent(self):
        return self.pressure

    def read(self, child_pids=()):
        return litequeue.MemoryReading(self.pressure, self.pressure, tree_bytes=12345)


def parse(text):
    return {family.name: family for family in parser.text_string_to_metric_families(text)}


def samples(families, name):
    return {tuple(sorted(s.labels.items())): s.value for s in families[name].samples}


# -- pressure history -------------------------------------------------------------------

def test_a_supervisor_records_a_sample_at_most_every_5s_and_drops_those_past_24h(queue):
    probe = ScriptedPressure()
    sup = litequeue.Supervisor(queue, probe=probe, poll=1, hold=1)
    base = litequeue.now()
    for second in range(21):                      # a poll each second of its clock
        probe.pressure = 10.0 + second
        sup.step(at=base + second)
    history = queue.pressure_history()
    assert [round(s["at"] - base, 6) for s in history] == [0, 5, 10, 15, 20]
    assert [s["pressure"] for s in history] == [10.0, 15.0, 20.0, 25.0, 30.0]
    assert {(s["level"], s["tree_bytes"], s["supervisor"]) for s in history} == {
        ("normal", 12345, sup.id)}
    assert [s["at"] for s in queue.pressure_history(since=base + 12)] == [base + 15, base + 20]

    probe.pressure = 80.0                         # a day later: what is older than 24 h goes
    sup.step(at=base + 24 * 3600 + 12)
    history = queue.pressure_history()
    assert [round(s["at"] - base, 6) for s in history] == [15, 20, 24 * 3600 + 12]
    assert history[-1]["level"] == "skip"


def test_a_real_serve_records_pressure_samples(db_path):
    litequeue.Queue(db_path).close()
    server = start_serve("--poll", "0.5", db=db_path)
    try:
        with litequeue.Queue(db_path) as queue:
            history = wait_for(lambda: len(queue.pressure_history()) >= 2 and
                               queue.pressure_history(), timeout=30)
            (sup,) = queue.live_supervisors()
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    assert server.returncode == 0
    first, second = history[:2]
    assert second["at"] - first["at"] >= 4.9
    assert {first["supervisor"], second["supervisor"]} == {sup["id"]}
    assert 0 < first["pressure"] <= 100 and first["level"] == "normal"


# -- metrics ----------------------------------------------------------------------------

def finish(queue, task, **options):
    """Enqueue a job of `task` and run it to done (or dead, with fail=True) by hand."""
    fail = options.pop("fail", False)
    job_id = queue.enqueue(task, {"secret": "s3cr3t-payload"}, **options)
    (job,) = queue.claim("w", tasks=[task])
    if fail:
        queue.fail(job.id, "w", job.attempts, "boom", retryable=False)
    else:
        queue.complete(job.id, "w", job.attempts)
    return job_id


def test_metrics_parse_with_every_family_of_its_type(queue):
    queue.task(lambda ctx: None, name="fragile", breaker_failures=1)
    queue.task(lambda ctx: None, name="echo")
    finish(queue, "heartbeat")
    finish(queue, "echo")
    finish(queue, "fragile", fail=True)
    queue.enqueue("echo", priority="high")
    queue.enqueue("echo", priority="low", delay=3600)     # not due: not waiting yet
    at = litequeue.now() + 10

    families = parse(queue.metrics_text(at=at))
    assert {name: f.type for name, f in families.items()} == FAMILIES
    jobs = samples(families, "litequeue_jobs")
    assert len(jobs) == 6 * 4
    assert jobs[("priority", "high"), ("state", "queued")] == 1
    assert jobs[("priority", "low"), ("state", "queued")] == 1
    assert jobs[("priority", "normal"), ("state", "dead")] == 1
    assert sum(jobs.values()) == 5
    assert 0 <= samples(families, "litequeue_memory_pressure_ratio")[()] <= 1
    assert samples(families, "litequeue_memory_level") == {
        (("level", "normal"),): 1, (("level", "skip"),): 0, (("level", "preempt"),): 0,
        (("level", "emergency"),): 0}
    assert samples(families, "litequeue_breaker_open")[(("task", "fragile"),)] == 1
    assert 10 <= samples(families, "litequeue_heartbeat_age_seconds")[()] < 20
    oldest = samples(families, "litequeue_oldest_queued_age_seconds")
    assert 10 <= oldest[(("priority", "high"),)] < 20
    assert oldest[(("priority", "low"),)] == 0                  # due in an hour
    assert samples(families, "litequeue_jobs_finished") == {
        (("state", "done"), ("task", "heartbeat")): 1, (("state", "done"), ("task", "echo")): 1,
        (("state", "dead"), ("task", "fragile")): 1}


def test_heartbeat_age_is_nan_before_any_heartbeat(queue):
    (value,) = samples(parse(queue.metrics_text()), "litequeue_heartbeat_age_seconds").values()
    assert value != value                                       # NaN


def test_the_finished_counter_does_not_go_down_on_purge_or_retry(queue):
    queue.task(lambda ctx: None, name="echo")
    for _ in range(3):
        finish(queue, "echo")
    dead = finish(queue, "echo", fail=True)
    key_done = (("state", "done"), ("task", "echo"))
    key_dead = (("state", "dead"), ("task", "echo"))

    def finished():
        return samples(parse(queue.metrics_text()), "litequeue_jobs_finished")

    assert finished() == {key_done: 3, key_dead: 1}
    queue.retry(dead)                          # it counted as dead once: it still does
    assert finished() == {key_done: 3, key_dead: 1}
    (job,) = queue.claim("w", tasks=["echo"])
    queue.complete(job.id, "w", job.attempts)
    assert finished() == {key_done: 4, key_dead: 1}
    assert queue.purge(0, at=litequeue.now() + 1) == 4
    assert queue.stats()["jobs"]["done"] == 0
    assert finished() == {key_done: 4, key_dead: 1}
    finish(queue, "echo")
    assert finished() == {key_done: 5, key_dead: 1}


def test_labels_carry_no_job_id_or_payload_and_are_escaped(queue):
    odd = 'we"ird\\task\nname'
    queue.task(lambda ctx: None, name=odd)
    job_ids = {str(finish(queue, odd)) for _ in range(3)}
    text = queue.metrics_text()
    assert "s3cr3t" not in text
    families = parse(text)
    labels = [s.labels for f in families.values() for s in f.samples]
    assert {key for label in labels for key in label} <= {"state", "priority", "level", "task"}
    assert not job_ids & {value for label in labels for value in label.values()}
    assert samples(families, "litequeue_jobs_finished") == {
        (("state", "done"), ("task", odd)): 3}


def test_metrics_command_prints_or_writes_a_readable_file_atomically(tmp_path, db_path):
    with litequeue.Queue(db_path) as queue:
        queue.enqueue("heartbeat")
    printed = run_cli("metrics", db=db_path)
    assert printed.returncode == 0, printed.stderr
    assert set(parse(printed.stdout)) == set(FAMILIES)

    target = tmp_path / "textfile" / "litequeue.prom"
    target.parent.mkdir()
    target.write_text("old\n")
    written = run_cli("metrics", "--textfile", target, db=db_path)
    assert written.returncode == 0, written.stderr
    assert written.stdout == ""
    assert set(parse(target.read_text())) == set(FAMILIES)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    assert os.listdir(target.parent) == ["litequeue.prom"]          # no temporary file left

    missing = run_cli("metrics", "--textfile", tmp_path / "nowhere" / "x.prom", db=db_path)
    assert missing.returncode == litequeue.EXIT_BAD_INPUT
    assert "nowhere" in missing.stderr and "Traceback" not in missing.stderr
