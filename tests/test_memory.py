"""The memory governor (issue 4): the pure decisions, levels with hysteresis, reading
pressure from cgroups and from the supervisor's tree, and real memory under
`serve --memory-budget` pushing jobs to be skipped, preempted and killed."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import litequeue
from litequeue import LevelTracker, MemoryReading, RunningView, plan_memory
from conftest import SCRIPT, run_cli, wait_for, write_app

MiB = 1 << 20
CRITICAL, HIGH, NORMAL, LOW = 0, 1, 2, 3


# ======================================================================================
# plan_memory: what each level decides, given the running jobs (pure)
# ======================================================================================

def view(job_id, priority, rss_mib=10, stop_reason=None, preemptions=0, started_tick=0.0):
    return RunningView(job_id, priority, rss_mib * MiB, started_tick, stop_reason, preemptions)


@pytest.mark.parametrize("level, start, shed", [
    ("normal", (0, 1, 2, 3), False),
    ("skip", (0, 1, 2), True),
    ("preempt", (0, 1), True),
    ("emergency", (0,), True),
])
def test_each_level_says_which_priorities_may_start_and_whether_to_shed(level, start, shed):
    plan = plan_memory(level, [])
    assert tuple(plan.start_priorities) == start
    assert plan.shed is shed
    assert plan.preempt is None and tuple(plan.kill) == ()


@pytest.mark.parametrize("level", ["normal", "skip"])
def test_below_preempt_no_running_job_is_touched(level):
    running = [view(1, LOW, 500), view(2, NORMAL, 900), view(3, HIGH), view(4, CRITICAL)]
    plan = plan_memory(level, running)
    assert plan.preempt is None and tuple(plan.kill) == ()


@pytest.mark.parametrize("running, victim", [
    pytest.param([view(1, NORMAL, 900), view(2, LOW, 10)], 2, id="lowest-priority-first"),
    pytest.param([view(1, LOW, 10), view(2, LOW, 300), view(3, LOW, 50)], 2,
                 id="largest-rss-among-equals"),
    pytest.param([view(1, HIGH, 900), view(2, CRITICAL, 900), view(3, NORMAL, 5)], 3,
                 id="normal-before-high-even-if-small"),
    pytest.param([view(1, HIGH, 900), view(2, CRITICAL, 900)], None,
                 id="never-high-or-critical"),
    pytest.param([view(1, CRITICAL, 900)], None, id="never-critical"),
    pytest.param([], None, id="nothing-running"),
    pytest.param([view(1, LOW, 100, stop_reason="preempt"), view(2, LOW, 50),
                  view(3, NORMAL, 500)], None, id="one-victim-at-a-time"),
    pytest.param([view(1, NORMAL, 100, stop_reason="preempt"), view(2, LOW, 50)], None,
                 id="waits-for-the-last-victim-whatever-its-priority"),
    pytest.param([view(1, LOW, 100, stop_reason="cancel"), view(2, NORMAL, 50)], 2,
                 id="a-job-already-stopping-is-not-chosen"),
    pytest.param([view(1, LOW, 100, preemptions=3), view(2, LOW, 100, preemptions=0)], 2,
                 id="fewest-preemptions-breaks-a-tie"),
])
def test_preempt_chooses_one_victim(running, victim):
    plan = plan_memory("preempt", running)
    assert plan.preempt == victim
    assert tuple(plan.kill) == ()
    assert tuple(plan.start_priorities) == (0, 1)


@pytest.mark.parametrize("running, killed", [
    pytest.param([view(1, CRITICAL), view(2, HIGH), view(3, NORMAL), view(4, LOW)], {2, 3, 4},
                 id="everything-below-critical"),
    pytest.param([view(1, LOW, stop_reason="preempt"), view(2, NORMAL)], {1, 2},
                 id="including-a-victim-still-in-its-grace"),
    pytest.param([view(1, CRITICAL), view(2, CRITICAL)], set(), id="critical-survives"),
    pytest.param([view(1, HIGH, stop_reason="emergency"), view(2, HIGH)], {2},
                 id="not-killed-twice"),
])
def test_emergency_kills_every_running_job_below_critical(running, killed):
    plan = plan_memory("emergency", running)
    assert set(plan.kill) == killed
    assert len(plan.kill) == len(killed)
    assert plan.preempt is None


# ======================================================================================
# LevelTracker: up at once, down only after a hold below threshold - margin
# ======================================================================================

@pytest.mark.parametrize("pressure, level", [
    (0.0, "normal"), (69.99, "normal"), (70.0, "skip"), (84.99, "skip"), (85.0, "preempt"),
    (94.99, "preempt"), (95.0, "emergency"), (100.0, "emergency"), (140.0, "emergency"),
])
def test_level_for_each_pressure(pressure, level):
    assert LevelTracker().level_for(pressure) == level


def feed(tracker, readings):
    """[(at, pressure), ...] -> the level after each reading."""
    return [tracker.update(pressure, at) for at, pressure in readings]


def test_level_goes_up_at_once_even_several_levels():
    tracker = LevelTracker(hold_s=10)
    assert feed(tracker, [(0, 10), (1, 90)]) == ["normal", "preempt"]
    assert feed(tracker, [(1.1, 99)]) == ["emergency"]


def test_level_is_left_only_after_the_hold_below_threshold_minus_margin():
    tracker = LevelTracker(thresholds=(70, 85, 95), margin=5, hold_s=10)
    tracker.update(90, 0)
    # 80.5 is below 85 but inside the margin: no hold starts, however long it lasts.
    assert feed(tracker, [(1, 80.5), (30, 80.5), (60, 80.0)]) == ["preempt"] * 3
    # Below 80 from t=61: still preempt until the hold has passed, then the level the
    # pressure calls for (skip), not straight to normal.
    assert feed(tracker, [(61, 79), (65, 75), (70.99, 79)]) == ["preempt"] * 3
    assert tracker.update(79, 71) == "skip"
    # Leaving skip in turn needs pressure below 65 for the hold.
    assert feed(tracker, [(72, 66), (100, 66), (101, 64), (110.9, 64)]) == ["skip"] * 4
    assert tracker.update(64, 111) == "normal"


def test_a_rise_above_threshold_minus_margin_resets_the_hold():
    tracker = LevelTracker(thresholds=(70, 85, 95), margin=5, hold_s=10)
    tracker.update(90, 0)
    assert feed(tracker, [(1, 70), (9, 70)]) == ["preempt", "preempt"]
    assert tracker.update(82, 10) == "preempt"          # back inside the margin: reset
    assert feed(tracker, [(11, 70), (20, 70), (20.9, 70)]) == ["preempt"] * 3
    assert tracker.update(70, 21) == "skip"             # 10 s counted from t=11


def test_a_rise_to_a_higher_level_during_the_hold_goes_up_at_once():
    tracker = LevelTracker(hold_s=10)
    tracker.update(88, 0)
    assert feed(tracker, [(1, 50), (5, 97), (6, 50), (15.9, 50)]) == [
        "preempt", "emergency", "emergency", "emergency"]
    assert tracker.update(50, 16) == "normal"           # far below every level: normal


@pytest.mark.parametrize("pressure_after, level_after", [
    (10, "normal"), (72, "skip"), (86, "preempt"), (89.9, "preempt"),
])
def test_leaving_emergency_drops_to_the_level_the_pressure_calls_for(pressure_after,
                                                                     level_after):
    tracker = LevelTracker(hold_s=2)
    tracker.update(96, 0)
    assert tracker.update(pressure_after, 1) == "emergency"
    assert tracker.update(pressure_after, 2.9) == "emergency"
    assert tracker.update(pressure_after, 3) == level_after


def test_emergency_is_held_while_pressure_stays_inside_its_margin():
    tracker = LevelTracker(hold_s=1)
    tracker.update(96, 0)
    assert feed(tracker, [(t, 90.5) for t in range(1, 30)]) == ["emergency"] * 29


def test_custom_thresholds_margin_and_zero_hold():
    tracker = LevelTracker(thresholds=(50, 60, 90), margin=2, hold_s=0)
    assert tracker.update(61, 0) == "preempt"
    assert tracker.update(58.5, 1) == "preempt"         # within the 2-point margin
    assert tracker.update(57.9, 2) == "skip"            # no hold: leaves at once
    assert tracker.update(47.9, 3) == "normal"


@pytest.mark.parametrize("thresholds, margin", [
    pytest.param((85, 70, 95), 5, id="not-rising"),
    pytest.param((70, 70, 95), 5, id="equal"),
    pytest.param((70, 85), 5, id="two-values"),
    pytest.param((50, 70, 85, 95), 5, id="four-values"),
    pytest.param((0, 85, 95), 0, id="zero"),
    pytest.param((-10, 85, 95), 5, id="negative"),
    pytest.param((70, 85, 101), 5, id="above-100"),
    pytest.param((70, 85, 95), -1, id="negative-margin"),
    pytest.param((70, 85, 95), 70, id="margin-as-large-as-first-threshold"),
])
def test_bad_thresholds_or_margin_are_bad_input(thresholds, margin):
    with pytest.raises(litequeue.BadInput):
        LevelTracker(thresholds, margin, 10)


def test_supervisor_rejects_bad_memory_options(queue):
    for options in ({"thresholds": (95, 85, 70)}, {"margin": 80}, {"hold": -1},
                    {"grace": "soon"}, {"poll": 0}, {"memory_budget": "lots"}):
        with pytest.raises(litequeue.BadInput):
            litequeue.Supervisor(queue, **options)


@pytest.mark.parametrize("args", [
    ["--thresholds", "90,80,95"], ["--thresholds", "70,85"], ["--thresholds", "a,b,c"],
    ["--margin", "75"], ["--hold", "-3"], ["--memory-budget", "0"],
])
def test_serve_rejects_bad_memory_options_with_exit_2(tmp_path, args):
    db = tmp_path / "q.db"
    result = run_cli("serve", "--burst", *args, db=db, timeout=30)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not db.exists(), "bad input must not create the database file"


# ======================================================================================
# Reading pressure: cgroup v1 / v2 trees made in tmp_path, PSS of the tree
# ======================================================================================

def make_files(root, files):
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def cgroup(tmp_path, proc_self_cgroup, files):
    root = tmp_path / "cgroup"
    root.mkdir()
    make_files(root, files)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(proc_self_cgroup)
    return litequeue.CgroupMemory(root=str(root), proc_self=str(proc))


def v2_stat(inactive_mib):
    return (f"anon 123\nfile 456\nactive_file 789\ninactive_file {inactive_mib * MiB}\n"
            f"slab 1\n")


def v1_stat(inactive_mib, own_inactive_mib=999):
    # v1 lists both this cgroup's inactive_file and the hierarchical total_inactive_file:
    # the total is the one that counts.
    return (f"cache 1\nrss 2\ninactive_file {own_inactive_mib * MiB}\n"
            f"total_rss 3\ntotal_inactive_file {inactive_mib * MiB}\n")


V1_UNLIMITED = "9223372036854771712\n"


def test_cgroup_v2_own_limit(tmp_path):
    cg = cgroup(tmp_path, "0::/app.slice/worker.service\n", {
        "cgroup.controllers": "cpu memory pids\n",
        "memory.max": "max\n",                              # the root has no limit file in
        "app.slice/memory.max": "max\n",                    # real life; 'max' is the same
        "app.slice/worker.service/memory.max": f"{1024 * MiB}\n",
        "app.slice/worker.service/memory.current": f"{600 * MiB}\n",
        "app.slice/worker.service/memory.stat": v2_stat(88),
    })
    assert cg.limit_bytes == 1024 * MiB
    assert cg.used_percent() == pytest.approx(100 * (600 - 88) / 1024)


def test_cgroup_v2_tightest_limit_among_ancestors(tmp_path):
    cg = cgroup(tmp_path, "0::/kube/pod/ctr\n", {
        "cgroup.controllers": "memory\n",
        "kube/memory.max": f"{4096 * MiB}\n",
        "kube/memory.current": f"{3000 * MiB}\n",
        "kube/memory.stat": v2_stat(0),
        "kube/pod/memory.max": f"{512 * MiB}\n",            # the tightest: it counts
        "kube/pod/memory.current": f"{450 * MiB}\n",
        "kube/pod/memory.stat": v2_stat(50),
        "kube/pod/ctr/memory.max": "max\n",
        "kube/pod/ctr/memory.current": f"{300 * MiB}\n",
        "kube/pod/ctr/memory.stat": v2_stat(10),
    })
    assert cg.limit_bytes == 512 * MiB
    # Usage of the cgroup whose limit binds (the pod: its own and its siblings' pages).
    assert cg.used_percent() == pytest.approx(100 * (450 - 50) / 512)


def test_cgroup_v2_max_everywhere_means_no_limit(tmp_path):
    cg = cgroup(tmp_path, "0::/user.slice/session\n", {
        "cgroup.controllers": "memory\n",
        "user.slice/memory.max": "max\n",
        "user.slice/session/memory.max": "max\n",
        "user.slice/session/memory.current": f"{100 * MiB}\n",
        "user.slice/session/memory.stat": v2_stat(0),
    })
    assert cg.limit_bytes is None
    assert cg.used_percent() is None


def test_cgroup_v2_inside_a_container_uses_the_mount(tmp_path):
    # Without a cgroup namespace the path names the host's hierarchy, which is not under
    # the container's mount: the mount itself is the container's cgroup.
    cg = cgroup(tmp_path, "0::/system.slice/docker-abc.scope\n", {
        "cgroup.controllers": "memory\n",
        "memory.max": f"{256 * MiB}\n",
        "memory.current": f"{200 * MiB}\n",
        "memory.stat": v2_stat(8),
    })
    assert cg.limit_bytes == 256 * MiB
    assert cg.used_percent() == pytest.approx(75.0)


def test_cgroup_v2_inactive_cache_above_usage_reads_zero(tmp_path):
    cg = cgroup(tmp_path, "0::/\n", {
        "cgroup.controllers": "memory\n",
        "memory.max": f"{100 * MiB}\n",
        "memory.current": f"{10 * MiB}\n",
        "memory.stat": v2_stat(20),
    })
    assert cg.used_percent() == 0.0


def test_cgroup_v1_limit_with_hybrid_lines(tmp_path):
    cg = cgroup(tmp_path, "12:pids:/docker/abc\n4:memory:/docker/abc\n"
                          "3:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n0::/\n", {
        "memory/memory.limit_in_bytes": V1_UNLIMITED,
        "memory/docker/memory.limit_in_bytes": V1_UNLIMITED,
        "memory/docker/abc/memory.limit_in_bytes": f"{2048 * MiB}\n",
        "memory/docker/abc/memory.usage_in_bytes": f"{1600 * MiB}\n",
        "memory/docker/abc/memory.stat": v1_stat(576),
    })
    assert cg.limit_bytes == 2048 * MiB
    assert cg.used_percent() == pytest.approx(100 * (1600 - 576) / 2048)


def test_cgroup_v1_tightest_limit_among_ancestors(tmp_path):
    cg = cgroup(tmp_path, "4:memory:/edge/app/worker\n", {
        "memory/memory.limit_in_bytes": V1_UNLIMITED,
        "memory/edge/memory.limit_in_bytes": f"{1024 * MiB}\n",
        "memory/edge/memory.usage_in_bytes": f"{900 * MiB}\n",
        "memory/edge/memory.stat": v1_stat(100),
        "memory/edge/app/memory.limit_in_bytes": f"{512 * MiB}\n",   # tightest
        "memory/edge/app/memory.usage_in_bytes": f"{400 * MiB}\n",
        "memory/edge/app/memory.stat": v1_stat(16),
        "memory/edge/app/worker/memory.limit_in_bytes": V1_UNLIMITED,
        "memory/edge/app/worker/memory.usage_in_bytes": f"{300 * MiB}\n",
        "memory/edge/app/worker/memory.stat": v1_stat(0),
    })
    assert cg.limit_bytes == 512 * MiB
    assert cg.used_percent() == pytest.approx(100 * (400 - 16) / 512)


def test_cgroup_v1_unlimited_means_no_limit(tmp_path):
    cg = cgroup(tmp_path, "4:memory:/user\n", {
        "memory/memory.limit_in_bytes": V1_UNLIMITED,
        "memory/user/memory.limit_in_bytes": V1_UNLIMITED,
        "memory/user/memory.usage_in_bytes": f"{300 * MiB}\n",
        "memory/user/memory.stat": v1_stat(0),
    })
    assert cg.limit_bytes is None
    assert cg.used_percent() is None


def test_no_proc_self_cgroup_means_no_limit(tmp_path):
    cg = litequeue.CgroupMemory(root=str(tmp_path), proc_self=str(tmp_path / "missing"))
    assert cg.limit_bytes is None and cg.used_percent() is None


class FixedCgroup:
    def __init__(self, percent):
        self.percent = percent

    def used_percent(self):
        return self.percent


def test_machine_reading_is_the_cgroups_where_a_limit_is_set(tmp_path):
    cg = cgroup(tmp_path, "0::/\n", {
        "cgroup.controllers": "memory\n",
        "memory.max": f"{100 * MiB}\n",
        "memory.current": f"{40 * MiB}\n",
        "memory.stat": v2_stat(4),
    })
    assert litequeue.MemoryProbe(cgroup=cg).machine_percent() == pytest.approx(36.0)


def test_machine_reading_without_a_cgroup_limit_is_total_minus_available(tmp_path):
    import psutil
    memory = psutil.virtual_memory()
    expected = 100.0 * (memory.total - memory.available) / memory.total
    probe = litequeue.MemoryProbe(cgroup=FixedCgroup(None))
    assert probe.machine_percent() == pytest.approx(expected, abs=3.0)


def test_pressure_is_the_larger_of_machine_and_budget():
    tree = litequeue.process_pss_bytes(os.getpid())
    assert tree > 1 * MiB
    roomy = litequeue.MemoryProbe(budget_bytes=100 * 1024 * MiB, cgroup=FixedCgroup(42.0))
    reading = roomy.read([])
    assert reading.machine_percent == 42.0 and reading.pressure == 42.0
    assert reading.budget_percent < 42.0
    tight = litequeue.MemoryProbe(budget_bytes=tree, cgroup=FixedCgroup(42.0))
    reading = tight.read([])
    assert reading.pressure == reading.budget_percent
    assert reading.pressure == pytest.approx(100.0, rel=0.2)
    no_budget = litequeue.MemoryProbe(cgroup=FixedCgroup(12.5)).read([])
    assert no_budget.pressure == 12.5 and no_budget.tree_bytes is None


def test_tree_counts_pages_shared_after_fork_once():
    block = bytearray(b"\x01") * (64 * MiB)                 # touched: resident in the parent
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                            # the child only holds the pages
        os.close(write_end)
        os.read(read_end, 1)
        os._exit(0)
    os.close(read_end)
    try:
        rss_sum = litequeue.process_rss_bytes(os.getpid()) + litequeue.process_rss_bytes(pid)
        probe = litequeue.MemoryProbe(budget_bytes=1024 * MiB, cgroup=FixedCgroup(0.0))
        reading = probe.read([pid])
        parent_rss = litequeue.process_rss_bytes(os.getpid())
        # Summed RSS counts the 64 MiB twice; the tree's PSS counts it once.
        assert rss_sum > reading.tree_bytes + 48 * MiB
        # PSS also divides the pages of shared libraries among every process that maps
        # them, so other Python processes on the machine lower it by several MiB: a wide
        # lower bound, still far above a tree that missed the 64 MiB block.
        assert parent_rss - 24 * MiB < reading.tree_bytes < parent_rss + 24 * MiB
        assert reading.budget_percent == pytest.approx(100 * reading.tree_bytes / (1024 * MiB))
    finally:
        os.write(write_end, b"x")
        os.close(write_end)
        os.waitpid(pid, 0)
    del block


def test_a_gone_process_counts_nothing():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert litequeue.process_rss_bytes(proc.pid) is None
    assert litequeue.process_pss_bytes(proc.pid) == 0


# ======================================================================================
# The supervisor with an injected probe: levels, shedding, events carrying the pressure
# ======================================================================================

class ScriptedProbe:
    """A probe whose pressure the test sets (or computes with a function)."""

    def __init__(self, pressure=0.0):
        self.pressure = pressure

    def _value(self):
        return self.pressure() if callable(self.pressure) else self.pressure

    def machine_percent(self):
        return self._value()

    def read(self, child_pids=()):
        value = self._value()
        return MemoryReading(value, value)


def level_changes(queue):
    return [(e["from_state"], e["to_state"], e["pressure"]) for e in queue.events(kind="level")]


def test_supervisor_sheds_due_low_shed_jobs_and_records_levels(queue):
    @queue.task(priority="low")
    def tidy(ctx):
        """A low job that is not shed=True: held back, never skipped."""

    @queue.task(priority="low", shed=True)
    def ping(ctx):
        """A shed=True low job."""

    probe = ScriptedProbe(10.0)
    sup = litequeue.Supervisor(queue, probe=probe, poll=0.25, hold=2, margin=5)
    base = litequeue.now() + 5                     # every job enqueued below is due by then
    assert sup.step(at=base) > base
    assert sup.tracker.level == "normal" and level_changes(queue) == []

    heartbeat = queue.enqueue("heartbeat")
    ping_id = ping.enqueue()
    later_ping = ping.enqueue_with(unique="later", delay=3600)
    tidy_id = tidy.enqueue()
    probe.pressure = 75.0
    sup.step(at=base + 0.25)
    assert sup.tracker.level == "skip"
    assert level_changes(queue) == [("normal", "skip", 75.0)]
    for job_id in (heartbeat, ping_id):
        assert queue.get(job_id).state == "skipped"
        (event,) = [e for e in queue.events(job_id=job_id) if e["to_state"] == "skipped"]
        assert (event["kind"], event["from_state"], event["pressure"]) == ("job", "queued", 75.0)
    assert queue.get(later_ping).state == "queued"     # not due: not shed
    assert queue.get(tidy_id).state == "queued"        # not shed=True: waits, not started
    assert queue.get(tidy_id).attempts == 0
    queue.cancel(tidy_id)                              # (this supervisor cannot fork in step)

    probe.pressure = 90.0
    sup.step(at=base + 0.5)
    probe.pressure = 96.5
    sup.step(at=base + 0.75)
    probe.pressure = 50.0
    sup.step(at=base + 1.0)                            # the hold (2 s) starts here
    sup.step(at=base + 2.75)
    assert sup.tracker.level == "emergency"
    sup.step(at=base + 3.0)
    assert sup.tracker.level == "normal"
    assert level_changes(queue) == [("normal", "skip", 75.0), ("skip", "preempt", 90.0),
                                    ("preempt", "emergency", 96.5),
                                    ("emergency", "normal", 50.0)]


def test_supervisor_polls_only_every_poll_interval(queue):
    probe = ScriptedProbe(10.0)
    calls = []
    probe.pressure = lambda: calls.append(1) or 10.0
    sup = litequeue.Supervisor(queue, probe=probe, poll=0.5)
    base = litequeue.now()
    wake = sup.step(at=base)
    assert len(calls) == 1 and wake <= base + 0.5
    sup.step(at=base + 0.2)
    assert len(calls) == 1
    sup.step(at=base + 0.5)
    assert len(calls) == 2


@pytest.mark.parametrize("jobs_per_child", [1, 4])
def test_preempted_chunked_job_resumes_with_injected_pressure(queue, jobs_per_child):
    """Deterministic pressure, real children: two low chunked jobs, pressure at 90 % until
    both have been preempted once. One victim at a time; both resume and finish. Two quick
    critical jobs run first, so with pooled children the chunked jobs run in reused ones."""
    tasks = litequeue.builtin_tasks(queue, demos=True)
    warm = [queue.enqueue("echo", {"n": i}, priority="critical") for i in range(2)]
    ids = [queue.enqueue("chunked", {"chunks": 20, "chunk_s": 0.05}) for _ in range(2)]
    reader = litequeue.Queue(queue.path)
    deadline = time.monotonic() + 20

    def pressure():
        if time.monotonic() > deadline:
            sup.stop(now_=True)
        jobs = [reader.get(i) for i in ids]
        if all(j.preemptions >= 1 for j in jobs):
            return 10.0
        # Pressure rises once both are running and have saved at least once.
        busy = all(j.state == "running" and (j.checkpoint or {}).get("i", 0) >= 1 for j in jobs)
        return 90.0 if busy or any(j.preemptions for j in jobs) else 10.0

    sup = litequeue.Supervisor(queue, slots=2, probe=ScriptedProbe(pressure), poll=0.05,
                               hold=0.2, grace=5, burst=True, tasks=tasks,
                               jobs_per_child=jobs_per_child)
    try:
        assert sup.run() == 0
    finally:
        reader.close()
    assert time.monotonic() < deadline, "the supervisor had to be stopped"
    assert all(queue.get(job_id).state == "done" for job_id in warm)
    for job_id in ids:
        job = queue.get(job_id)
        assert job.state == "done"
        assert job.result == {"sum": sum(range(20)), "chunks": 20}
        assert job.preemptions == 1
        assert job.attempts == 1                       # preempted after a save: not charged
    decisions = [e for e in queue.events(kind="decision") if e["to_state"] == "preempt"]
    assert sorted(e["job_id"] for e in decisions) == sorted(ids)
    assert all(e["pressure"] == 90.0 for e in decisions)
    # One victim at a time: the second is chosen only after the first is back in the queue.
    first, second = decisions
    (first_back,) = [e for e in queue.events(job_id=first["job_id"], kind="job")
                     if (e["from_state"], e["to_state"]) == ("running", "queued")]
    assert first_back["id"] < second["id"]
    assert first_back["pressure"] == 90.0


def test_emergency_with_injected_pressure_kills_at_once_and_charges_only_without_checkpoint(
        queue):
    """Pressure jumps straight to 97 %: both jobs below critical are killed in the same poll,
    without being asked. The chunked job had saved since it started: not charged. The
    sleeping one had not: charged. Critical runs on. All finish once pressure falls."""
    tasks = litequeue.builtin_tasks(queue, demos=True)
    chunked = queue.enqueue("chunked", {"chunks": 20, "chunk_s": 0.05})
    sleeper = queue.enqueue("sleep", {"seconds": 1.0}, priority="normal")
    critical = queue.enqueue("sleep", {"seconds": 1.5}, priority="critical")
    reader = litequeue.Queue(queue.path)
    deadline = time.monotonic() + 20

    def pressure():
        if time.monotonic() > deadline:
            sup.stop(now_=True)
        jobs = {i: reader.get(i) for i in (chunked, sleeper, critical)}
        if all(jobs[i].preemptions for i in (chunked, sleeper)):
            return 10.0
        ready = (all(j.state == "running" for j in jobs.values())
                 and (jobs[chunked].checkpoint or {}).get("i", 0) >= 2)
        return 97.0 if ready or jobs[chunked].preemptions or jobs[sleeper].preemptions else 10.0

    sup = litequeue.Supervisor(queue, slots=3, probe=ScriptedProbe(pressure), poll=0.05,
                               hold=0.2, grace=5, burst=True, tasks=tasks)
    try:
        assert sup.run() == 0
    finally:
        reader.close()
    assert time.monotonic() < deadline, "the supervisor had to be stopped"
    kills = [e for e in queue.events(kind="decision")]
    assert sorted((e["job_id"], e["to_state"], e["pressure"]) for e in kills) == [
        (chunked, "kill", 97.0), (sleeper, "kill", 97.0)]
    assert [(f, t) for f, t, _ in level_changes(queue)] == [("normal", "emergency"),
                                                             ("emergency", "normal")]
    job = queue.get(chunked)
    assert (job.state, job.attempts, job.preemptions) == ("done", 1, 1)
    assert job.result == {"sum": sum(range(20)), "chunks": 20}
    job = queue.get(sleeper)
    assert (job.state, job.attempts, job.preemptions) == ("done", 2, 1)
    job = queue.get(critical)
    assert (job.state, job.attempts, job.preemptions) == ("done", 1, 0)
    back = {e["job_id"]: e for e in queue.events(kind="job")
            if (e["from_state"], e["to_state"]) == ("running", "queued")}
    assert set(back) == {chunked, sleeper}
    assert "stopped before saving a checkpoint" in back[sleeper]["reason"]
    assert "stopped before saving" not in back[chunked]["reason"]
    assert all(e["pressure"] == 97.0 for e in back.values())


@pytest.mark.skipif(not os.path.exists("/proc/pressure/memory"), reason="kernel without PSI")
def test_status_shows_the_kernels_memory_pressure_stall_info(queue):
    psi = queue.status()["memory"]["psi"]
    assert {"some_avg10", "some_avg60", "full_avg10"} <= set(psi)
    assert all(0.0 <= value <= 100.0 for value in psi.values())


# ======================================================================================
# Real memory: `serve --memory-budget` and tasks that allocate for real
# ======================================================================================
#
# The pressure here is the supervisor tree's PSS against the budget (the machine is far
# from full). Measured on the 2-core / 24 GiB machine: an idle `serve` is 20-25 MiB of PSS;
# each forked child adds ~4 MiB of its own pages; a hog of N MiB adds N MiB, and a hog
# sized from the idle supervisor (measured in each test) lands within a point of its
# target. With a 400 MiB budget the bands (skip 70-85 %, preempt 85-95 %) are 60 and
# 40 MiB wide and the hogs aim at their middle. Touching memory is slow in this VM
# (~450 MiB/s), so the budget is no larger than it needs to be.

BUDGET_MIB = 400
CHILD_MIB = 5                     # allowance for each child's own pages (measured ~4)
POLL_S, HOLD_S, GRACE_S = 0.1, 0.5, 2.0


APP = """
def trace(path, line):
    with open(path, "a") as f:
        f.write(line + "\\n")

@queue.task(priority="low")
def chunked(ctx, chunks, chunk_s, trace_path):
    \"\"\"The built-in chunked task, writing down where each run starts and each chunk.\"\"\"
    state = ctx.checkpoint or {"i": 0, "sum": 0}
    trace(trace_path, f"start {state['i']}")
    while state["i"] < chunks:
        time.sleep(chunk_s)
        trace(trace_path, f"chunk {state['i']}")
        state = {"i": state["i"] + 1, "sum": state["sum"] + state["i"]}
        ctx.save(state)
    return {"sum": state["sum"], "chunks": chunks}

@queue.task
def hog(ctx, mb, seconds):
    \"\"\"The built-in hog: holds mb MiB of touched memory for a while.\"\"\"
    block = bytearray(b"\\x01") * (mb << 20)
    time.sleep(seconds)
    return {"held": len(block) >> 20}

@queue.task
def shell_hog(ctx, mb, seconds):
    \"\"\"Shells out to a program that holds the memory (ffmpeg, convert, ...).\"\"\"
    import subprocess
    code = f"import time; b = bytearray(b'\\\\x01') * ({mb} << 20); time.sleep({seconds})"
    subprocess.run([sys.executable, "-c", code], check=True)
    return {"held": mb}

@queue.task(priority="low")
def stall(ctx, seconds):
    \"\"\"Never reaches a checkpoint: can only be killed.\"\"\"
    time.sleep(seconds)
    return {"slept": seconds}
"""


class Serving:
    """A real `python litequeue.py serve --memory-budget ... --app tasks.py` and a queue on
    its file."""

    def __init__(self, tmp_path, *extra, slots=2):
        self.db = str(tmp_path / "q.db")
        self.queue = litequeue.Queue(self.db)      # the file exists before serve opens it
        self.log_path = tmp_path / "serve.log"
        app = write_app(tmp_path, APP)
        command = [sys.executable, SCRIPT, "serve", "--db", self.db, "--app", app,
                   "--memory-budget", f"{BUDGET_MIB}M", "--memory-limit", "2G",
                   "--poll", str(POLL_S), "--hold", str(HOLD_S), "--grace", str(GRACE_S),
                   "--slots", str(slots), *extra]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log,
                                         cwd=str(tmp_path),
                                         env={**os.environ, "LITEQUEUE_DB": self.db})
        self.idle_mib = None

    def ready(self):
        """Wait until it serves, then measure its idle PSS (hogs are sized from it)."""
        wait_for(lambda: self.proc.poll() is not None or self.queue.live_supervisors(),
                 timeout=20)
        assert self.proc.poll() is None, "serve exited"
        time.sleep(0.3)                 # a few polls in: the idle size it keeps while serving
        self.idle_mib = litequeue.process_pss_bytes(self.proc.pid) / MiB
        assert 5 < self.idle_mib < 100, self.idle_mib

    def hog_mib(self, target_percent, children):
        """Hog size that brings the tree to target_percent of the budget with `children`
        children running (the hog among them)."""
        return int(BUDGET_MIB * target_percent / 100 - self.idle_mib - children * CHILD_MIB)

    def log(self):
        return self.log_path.read_text()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)      # the second signal: at once
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self.queue.close()
        return self.proc.returncode


@contextlib.contextmanager
def serving(tmp_path, *extra, **options):
    served = Serving(tmp_path, *extra, **options)
    try:
        served.ready()
        yield served
    except BaseException:
        served.stop()
        print("---- serve log ----\n" + served.log()[-6000:])
        raise
    assert served.stop() == 0, served.log()[-6000:]


def levels_seen(queue):
    return [e["to_state"] for e in queue.events(kind="level")]


def job_events(queue, job_id):
    return [e for e in queue.events(job_id=job_id) if e["kind"] in ("job", "decision")]


def wait_state(queue, job_id, *states, timeout=20.0):
    return wait_for(lambda: queue.get(job_id).state in states and queue.get(job_id),
                    timeout=timeout)


def test_real_pressure_past_70_percent_skips_a_due_heartbeat(tmp_path):
    with serving(tmp_path) as s:
        q = s.queue
        hog = q.enqueue("hog", {"mb": s.hog_mib(77.5, children=1), "seconds": 5})
        assert q.get(hog).priority == "normal"
        wait_for(lambda: "skip" in levels_seen(q), timeout=10)
        (rise,) = [e for e in q.events(kind="level") if e["to_state"] == "skip"]
        assert 70 <= rise["pressure"] < 85, rise["pressure"]
        # `status` shows the level and pressure the supervisor last recorded.
        wait_for(lambda: q.status()["memory"]["level"] == "skip", timeout=5)
        result = run_cli("status", "--json", db=s.db)
        memory = json.loads(result.stdout)["memory"]
        assert memory["level"] == "skip" and 70 <= memory["pressure"] < 85, memory

        # The cron way: `litequeue.py enqueue heartbeat` while memory is tight.
        result = run_cli("enqueue", "heartbeat", db=s.db)
        assert result.returncode == 0, result.stderr
        heartbeat = int(result.stdout)
        job = wait_state(q, heartbeat, "skipped", "done", timeout=10)
        assert job.state == "skipped" and job.attempts == 0
        (skipped,) = [e for e in job_events(q, heartbeat) if e["to_state"] == "skipped"]
        assert skipped["kind"] == "job" and skipped["from_state"] == "queued"
        assert 70 <= skipped["pressure"] < 85, skipped["pressure"]

        assert wait_state(q, hog, "done", "dead").state == "done"
        wait_for(lambda: levels_seen(q)[-1] == "normal", timeout=10)
        assert levels_seen(q) == ["skip", "normal"], "the hog was sized for the skip band"
        fall = q.events(kind="level")[-1]
        assert fall["from_state"] == "skip" and fall["pressure"] < 65
        # Pressure has fallen: the next heartbeat runs.
        heartbeat = q.enqueue("heartbeat")
        assert wait_state(q, heartbeat, "done", "skipped").state == "done"


def test_real_pressure_past_85_percent_preempts_a_chunked_job_which_resumes(tmp_path):
    trace = tmp_path / "trace.txt"
    chunks = 24
    with serving(tmp_path) as s:
        q = s.queue
        job_id = q.enqueue("chunked", {"chunks": chunks, "chunk_s": 0.15,
                                       "trace_path": str(trace)})
        wait_for(lambda: (q.get(job_id).checkpoint or {}).get("i", 0) >= 2, timeout=10)
        hog = q.enqueue("hog", {"mb": s.hog_mib(90, children=2), "seconds": 2.5},
                        priority="high")

        # Asked to stop, saved, back in the queue: not charged, preempted once.
        wait_for(lambda: q.get(job_id).preemptions >= 1, timeout=10)
        job = q.get(job_id)
        assert job.state == "queued" and job.attempts == 0
        saved = job.checkpoint
        assert 2 <= saved["i"] < chunks
        (ask,) = [e for e in job_events(q, job_id) if e["kind"] == "decision"]
        assert ask["to_state"] == "preempt" and 85 <= ask["pressure"] < 95, ask["pressure"]
        back = [e for e in job_events(q, job_id) if (e["from_state"], e["to_state"])
                == ("running", "queued")]
        assert len(back) == 1 and back[0]["at"] - ask["at"] < GRACE_S   # it saved in time
        assert "stopped before saving" not in (back[0]["reason"] or "")
        # While pressure is high (the hog runs) a low job is not started again.
        assert q.get(hog).state == "running"
        assert q.get(job_id).state == "queued"

        job = wait_state(q, job_id, "done", "dead", timeout=20)
        assert job.state == "done"
        assert job.result == {"sum": sum(range(chunks)), "chunks": chunks}   # uninterrupted
        assert job.attempts == 1 and job.preemptions == 1
        assert q.get(hog).state == "done"
        # It resumed only once the level had fallen, after the hog had finished.
        restarted = [e for e in job_events(q, job_id) if e["to_state"] == "running"][1]
        fell = [e for e in q.events(kind="level") if e["to_state"] == "normal"]
        hog_done = [e for e in q.events(job_id=hog) if e["to_state"] == "done"][0]
        assert fell and hog_done["id"] < fell[0]["id"] < restarted["id"]
        assert max(levels_seen(q), key=litequeue.LEVELS.index) == "preempt"

    lines = trace.read_text().split()
    starts = [int(n) for word, n in zip(lines[::2], lines[1::2]) if word == "start"]
    done = [int(n) for word, n in zip(lines[::2], lines[1::2]) if word == "chunk"]
    assert starts == [0, saved["i"]]               # the second run began at the checkpoint
    assert done == list(range(chunks))             # every chunk once: none lost, none redone


def test_real_pressure_kills_a_job_that_never_checkpoints_after_the_grace(tmp_path):
    with serving(tmp_path) as s:
        q = s.queue
        stuck = q.enqueue("stall", {"seconds": 30})
        wait_state(q, stuck, "running")
        hog = q.enqueue("hog", {"mb": s.hog_mib(90, children=2), "seconds": GRACE_S + 1.5},
                        priority="high")
        job = wait_for(lambda: q.get(stuck).preemptions >= 1 and q.get(stuck), timeout=15)
        assert job.attempts == 1, "no checkpoint since it started: the attempt is charged"
        decisions = [e for e in job_events(q, stuck) if e["kind"] == "decision"]
        ask = decisions[0]
        assert ask["to_state"] == "preempt" and 85 <= ask["pressure"] < 95, ask["pressure"]
        (back,) = [e for e in job_events(q, stuck) if (e["from_state"], e["to_state"])
                   == ("running", "queued")]
        assert GRACE_S - 0.3 <= back["at"] - ask["at"] < GRACE_S + 1.0
        assert "stopped before saving a checkpoint" in back["reason"]
        assert back["pressure"] is not None and back["pressure"] >= 80
        assert q.get(hog).state == "running"          # high: never preempted
        # Once the hog is done and pressure falls, the job runs again (nothing lost).
        assert wait_state(q, hog, "done", "dead").state == "done"
        job = wait_for(lambda: q.get(stuck).attempts == 2 and q.get(stuck), timeout=10)
        assert job.state == "running"
        # The kill after the grace is a decision too: in the events, with its pressure.
        assert [e["to_state"] for e in decisions] == ["preempt", "kill"], decisions
        kill = decisions[1]
        assert GRACE_S - 0.3 <= kill["at"] - ask["at"] < GRACE_S + 1.0
        assert kill["pressure"] is not None and kill["pressure"] >= 80
    with litequeue.Queue(s.db) as q:
        assert q.get(stuck).state == "queued"          # the shutdown gave it back


def test_real_pressure_past_95_percent_kills_every_job_below_critical_at_once(tmp_path):
    with serving(tmp_path, slots=4) as s:
        q = s.queue
        sleepers = {p: q.enqueue("stall", {"seconds": 3}, priority=p)
                    for p in ("critical", "normal", "low")}
        for job_id in sleepers.values():
            wait_state(q, job_id, "running")
        hog = q.enqueue("hog", {"mb": s.hog_mib(112, children=4), "seconds": 10},
                        priority="high", max_attempts=1)
        assert wait_state(q, hog, "dead", "done", timeout=15).state == "dead"

        kills = [e for e in q.events(kind="decision") if e["to_state"] == "kill"]
        victims = {sleepers["normal"], sleepers["low"], hog}
        assert {e["job_id"] for e in kills} == victims and len(kills) == 3
        assert all(e["pressure"] >= 95 for e in kills), kills
        assert max(e["at"] for e in kills) - min(e["at"] for e in kills) < 0.5   # one poll
        (rise,) = [e for e in q.events(kind="level") if e["to_state"] == "emergency"]
        assert rise["pressure"] >= 95
        # Above the emergency threshold no longer than a poll plus the time to kill.
        hog_dead = [e for e in q.events(job_id=hog) if e["to_state"] == "dead"][0]
        assert hog_dead["at"] - rise["at"] < 1.0
        job = q.get(hog)
        assert "memory pressure" in job.error and job.attempts == 1   # can never fit: dead

        for priority in ("normal", "low"):
            back = [e for e in job_events(q, sleepers[priority])
                    if (e["from_state"], e["to_state"]) == ("running", "queued")]
            assert len(back) == 1 and "memory emergency" in back[0]["reason"]
            assert back[0]["pressure"] >= 95
        # Critical survives; the others run again once pressure falls, and finish.
        for priority, attempts in (("critical", 1), ("normal", 2), ("low", 2)):
            job = wait_state(q, sleepers[priority], "done", "dead", timeout=20)
            assert (job.state, job.attempts) == ("done", attempts), priority
        assert not [e for e in job_events(q, sleepers["critical"]) if e["kind"] == "decision"]
        assert levels_seen(q)[-1] == "normal"


def test_real_pressure_counts_what_a_job_runs_in_its_own_subprocesses(tmp_path):
    """The tree is the supervisor and all its descendants: a task that shells out to a
    memory-hungry program (ffmpeg, ImageMagick) does not escape the budget."""
    import psutil
    with serving(tmp_path) as s:
        q = s.queue
        mb = s.hog_mib(77.5, children=2)
        job_id = q.enqueue("shell_hog", {"mb": mb, "seconds": 3})

        def grandchild_holds_its_memory():
            return any((litequeue.process_rss_bytes(p.pid) or 0) > 0.9 * mb * MiB
                       for p in psutil.Process(s.proc.pid).children(recursive=True))

        wait_for(grandchild_holds_its_memory, timeout=10)
        assert q.get(job_id).state == "running"
        with contextlib.suppress(AssertionError):
            wait_for(lambda: "skip" in levels_seen(q), timeout=20 * POLL_S)
        heartbeat = q.enqueue("heartbeat")
        job = wait_state(q, heartbeat, "skipped", "done", timeout=10)
        assert wait_state(q, job_id, "done", "dead").state == "done"
        assert "skip" in levels_seen(q), "the memory of the job's subprocess was not counted"
        assert job.state == "skipped"


def test_probe_estimate_tracks_real_pss_across_forks_and_growth(tmp_path):
    """The probe reads PSS only now and then and estimates from RSS in between; the estimate
    must match a full PSS read after a fork (sharing changed) and while a child grows."""
    import multiprocessing

    MiB = 1 << 20
    probe = litequeue.MemoryProbe(1 << 30)
    ctx = multiprocessing.get_context("fork")
    grow, release, grown_one = ctx.Event(), ctx.Event(), ctx.Semaphore(0)

    def child(grow, release, grown_one):
        grow.wait()
        block = bytearray(b"x") * (60 * MiB)
        grown_one.release()
        release.wait()
        return len(block)

    def exact(pids):
        return sum(litequeue.process_pss_bytes(p) for p in [os.getpid(), *pids])

    before = probe.read([]).tree_bytes
    children = [ctx.Process(target=child, args=(grow, release, grown_one)) for _ in range(2)]
    for c in children:
        c.start()
    try:
        pids = [c.pid for c in children]
        after_fork = probe.read(pids).tree_bytes
        assert abs(after_fork - exact(pids)) < 3 * MiB, (before, after_fork, exact(pids))
        grow.set()
        assert grown_one.acquire(timeout=20) and grown_one.acquire(timeout=20)
        grown = probe.read(pids).tree_bytes          # within the 1 s between full reads
        assert grown - after_fork > 110 * MiB
        assert abs(grown - exact(pids)) < 6 * MiB, (grown, exact(pids))
    finally:
        release.set()
        for c in children:
            c.join(10)
