"""PSI wake-ups: the supervisor registers a kernel memory-pressure trigger and reads memory
as soon as it fires, not only at the next poll. Real triggers on /proc/pressure/memory,
a real POLLPRI (socket out-of-band data) for the sleeper, a real supervisor preempting a
real child at a fire with a 30 s poll, and real memory stalls in a small v1 cgroup."""

import ctypes
import errno
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import litequeue
from litequeue import MemoryReading
from conftest import run_cli, wait_for

MiB = 1 << 20
PROC_PRESSURE = "/proc/pressure/memory"
needs_psi = pytest.mark.skipif(not os.path.exists(PROC_PRESSURE),
                               reason="this kernel has no PSI (/proc/pressure/memory)")


def has_cap_sys_resource():
    """The kernel lets only CAP_SYS_RESOURCE use windows that are not multiples of 2 s."""
    with open("/proc/self/status") as f:
        cap_eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return bool(cap_eff & (1 << 24))


# ======================================================================================
# The trigger: which file, registering for real, falling back
# ======================================================================================

@needs_psi
def test_trigger_registers_on_proc_pressure_memory():
    trigger = litequeue._PressureTrigger.open(PROC_PRESSURE)
    try:
        assert trigger.path == PROC_PRESSURE and trigger.stall_us == litequeue.PSI_STALL_US
        # 1 s where the kernel allows it, else the 2 s fallback.
        assert trigger.window_us == (1_000_000 if has_cap_sys_resource() else 2_000_000)
        # The kernel holds one trigger per open file: a second is refused (EBUSY), which
        # it only is once the first is registered.
        with pytest.raises(OSError) as refused:
            os.write(trigger.fd, b"some 100000 2000000\0")
        assert refused.value.errno == errno.EBUSY
    finally:
        trigger.close()
    assert trigger.fd is None


@needs_psi
def test_a_refused_window_falls_back_to_the_next_and_all_refused_raises():
    # Windows under 500 ms are refused by every kernel.
    trigger = litequeue._PressureTrigger.open(PROC_PRESSURE, windows_us=(400_000, 2_000_000))
    try:
        assert trigger.window_us == 2_000_000
    finally:
        trigger.close()
    with pytest.raises(OSError) as refused:
        litequeue._PressureTrigger.open(PROC_PRESSURE, windows_us=(400_000,))
    assert refused.value.errno == errno.EINVAL


def write_files(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_pressure_file_is_the_limiting_v2_groups_else_the_machines(tmp_path):
    write_files(tmp_path, {"cgroup.controllers": "memory\n", "app/memory.max": f"{MiB}\n",
                           "app/memory.current": "0\n", "app/memory.stat": "inactive_file 0\n",
                           "self": "0::/app\n"})
    v2 = litequeue.CgroupMemory(root=str(tmp_path), proc_self=str(tmp_path / "self"))
    assert litequeue.memory_pressure_files(v2) == (str(tmp_path / "app" / "memory.pressure"),
                                                   PROC_PRESSURE)

    write_files(tmp_path, {"memory/job/memory.limit_in_bytes": f"{MiB}\n",
                           "self1": "4:memory:/job\n"})
    v1 = litequeue.CgroupMemory(root=str(tmp_path), proc_self=str(tmp_path / "self1"))
    assert v1.limit_bytes == MiB            # a v1 limit: no memory.pressure to use
    assert litequeue.memory_pressure_files(v1) == (PROC_PRESSURE,)
    unlimited = litequeue.CgroupMemory(root=str(tmp_path), proc_self=str(tmp_path / "none"))
    assert litequeue.memory_pressure_files(unlimited) == (PROC_PRESSURE,)
    assert litequeue.memory_pressure_files(None) == (PROC_PRESSURE,)


class GroupPressure:
    def __init__(self, path):
        self.pressure_path = path


def test_no_psi_falls_back_to_polling_and_says_why(tmp_path):
    trigger, said = litequeue.open_pressure_trigger(
        GroupPressure("/nonexistent/memory.pressure"), machine=str(tmp_path / "no-psi"))
    assert trigger is None
    assert said == (f"PSI wake-ups unavailable (/nonexistent/memory.pressure: No such file or "
                    f"directory; {tmp_path / 'no-psi'}: No such file or directory): memory is "
                    f"read at each poll only")
    trigger, said = litequeue.open_pressure_trigger(None, enabled=False)
    assert trigger is None and "--no-psi" in said


@needs_psi
def test_a_group_file_that_refuses_falls_back_to_the_machines():
    trigger, said = litequeue.open_pressure_trigger(GroupPressure("/nonexistent/memory.pressure"))
    try:
        assert trigger.path == PROC_PRESSURE
        assert said.startswith(f"PSI wake-ups on: memory is read again when {PROC_PRESSURE} ")
    finally:
        trigger.close()


@needs_psi
def test_psi_on_says_which_file():
    trigger, said = litequeue.open_pressure_trigger(None)
    try:
        assert said.startswith(f"PSI wake-ups on: memory is read again when {PROC_PRESSURE} "
                               f"(some 20 ms in ")
    finally:
        trigger.close()


@pytest.mark.parametrize("flag, said", [
    ("--psi", f"PSI wake-ups on: memory is read again when {PROC_PRESSURE} (some 20 ms in "),
    ("--no-psi", "PSI wake-ups off (--no-psi): memory is read at each poll only"),
])
@needs_psi
def test_serve_says_at_start_whether_psi_wake_ups_are_on(tmp_path, flag, said):
    result = run_cli("serve", "--burst", flag, db=tmp_path / "q.db")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "PSI wake-ups" in line]
    assert len(lines) == 1 and said in lines[0]


# ======================================================================================
# The sleeper wakes on POLLPRI
# ======================================================================================

class FdTrigger:
    """A trigger on any fd: the sleeper polls it for POLLPRI as it would a PSI file."""

    def __init__(self, fd, path="test"):
        self.fd, self.path, self.closed = fd, path, False

    def close(self):
        self.closed = True


@pytest.fixture
def oob_pair():
    """A socket pair: sending out-of-band data on one makes the other poll POLLPRI
    (Linux >= 5.15 for AF_UNIX), a real POLLPRI without stalling anything."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def sleeper_for(tmp_path, trigger):
    libc = ctypes.CDLL(None, use_errno=True)
    return litequeue._Sleeper(str(tmp_path / "q.db"), libc, 0.01, trigger)


@pytest.mark.parametrize("watch_writes", [True, False])
def test_sleeper_wakes_at_once_on_pollpri(tmp_path, oob_pair, watch_writes):
    a, b = oob_pair
    sleeper = sleeper_for(tmp_path, FdTrigger(a.fileno()))
    pool = litequeue.ChildPool(None, None)
    try:
        t0 = time.monotonic()
        assert sleeper.sleep(t0 + 0.2, pool, watch_writes=watch_writes) is False
        assert time.monotonic() - t0 >= 0.19          # nothing fired: slept it out
        b.send(b"x", socket.MSG_OOB)
        t0 = time.monotonic()
        assert sleeper.sleep(t0 + 10, pool, watch_writes=watch_writes) is True
        assert time.monotonic() - t0 < 1.0
        assert sleeper.trigger is not None
    finally:
        sleeper.close()


def test_sleeper_quietly_wakes_on_pollpri_too(tmp_path, oob_pair):
    a, b = oob_pair
    sleeper = sleeper_for(tmp_path, FdTrigger(a.fileno()))
    try:
        b.send(b"x", socket.MSG_OOB)
        t0 = time.monotonic()
        assert sleeper.sleep_quietly(t0 + 10) is True
        assert time.monotonic() - t0 < 1.0
    finally:
        sleeper.close()


def test_sleeper_still_wakes_for_readable_fds_with_a_trigger(tmp_path, oob_pair):
    """A plain readable fd (here a signal through the wake-up pipe) still wakes it, and is
    not taken for a stall."""
    a, _ = oob_pair
    sleeper = sleeper_for(tmp_path, FdTrigger(a.fileno()))
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        t0 = time.monotonic()
        assert sleeper.sleep(t0 + 10, litequeue.ChildPool(None, None),
                             watch_writes=False) is False
        assert time.monotonic() - t0 < 5.0
    finally:
        signal.signal(signal.SIGUSR1, previous)
        sleeper.close()


def test_a_failed_trigger_is_dropped_and_polling_goes_on(tmp_path, caplog):
    """POLLERR (as when the trigger's cgroup is removed) would come back at every poll: the
    sleeper lets the trigger go, says so, and sleeps on without it."""
    r, w = os.pipe()
    os.close(r)                                   # the write end now polls POLLERR
    trigger = FdTrigger(w, path="/gone/memory.pressure")
    sleeper = sleeper_for(tmp_path, trigger)
    pool = litequeue.ChildPool(None, None)
    try:
        assert sleeper.sleep(time.monotonic() + 5, pool, watch_writes=False) is False
        assert sleeper.trigger is None and trigger.closed
        assert "PSI trigger on /gone/memory.pressure failed" in caplog.text
        t0 = time.monotonic()
        assert sleeper.sleep(t0 + 0.1, pool, watch_writes=False) is False
        assert time.monotonic() - t0 >= 0.09
    finally:
        os.close(w)
        sleeper.close()


# ======================================================================================
# The supervisor reads memory at once after a fire
# ======================================================================================

class ScriptedProbe:
    def __init__(self, pressure):
        self.pressure, self.reads = pressure, 0

    def read(self, child_pids=()):
        self.reads += 1
        value = self.pressure() if callable(self.pressure) else self.pressure
        return MemoryReading(value, value)


def test_a_step_after_a_stall_polls_memory_at_once_even_with_a_long_poll(queue):
    probe = ScriptedProbe(10.0)
    sup = litequeue.Supervisor(queue, probe=probe, poll=30)
    base = litequeue.now()
    sup.step(at=base)
    assert probe.reads == 1
    probe.pressure = 90.0
    sup.step(at=base + 0.1)
    assert probe.reads == 1 and sup.tracker.level == "normal"    # no fire: no poll
    sup.memory_stalled()
    sup.step(at=base + 0.2)
    assert probe.reads == 2 and sup.tracker.level == "preempt"
    (event,) = queue.events(kind="level")
    assert (event["to_state"], event["pressure"]) == ("preempt", 90.0)
    sup.step(at=base + 0.3)
    sup.step(at=base + 29)
    assert probe.reads == 2                          # and polls every 30 s from there
    sup.step(at=base + 30.2)
    assert probe.reads == 3


def test_a_fire_preempts_a_real_job_long_before_the_poll(queue, oob_pair):
    """serve's loop with --poll 30: a low chunked job runs; pressure rises (the probe says
    90 %) and the trigger fires (a real POLLPRI): the job is asked to stop at once."""
    a, b = oob_pair
    tasks = litequeue.builtin_tasks(queue, demos=True)
    job_id = queue.enqueue("chunked", {"chunks": 400, "chunk_s": 0.05}, priority="low")
    reader = litequeue.Queue(queue.path)
    fired_at = []

    def saved():
        job = reader.get(job_id)
        return job.state == "running" and (job.checkpoint or {}).get("i", 0) >= 1

    def decided():
        return [e for e in reader.events(kind="decision") if e["job_id"] == job_id]

    def pressure():
        return 90.0 if fired_at else 10.0

    def fire_then_stop():
        try:
            wait_for(saved, timeout=20)
            fired_at.append(time.monotonic())
            b.send(b"x", socket.MSG_OOB)
            wait_for(decided, timeout=20)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)     # as serve is stopped: wakes the loop

    sup = litequeue.Supervisor(queue, probe=ScriptedProbe(pressure), poll=30, grace=5,
                               tasks=tasks, pressure_trigger=FdTrigger(a.fileno()))
    helper = threading.Thread(target=fire_then_stop)
    helper.start()
    t_run = time.monotonic()
    try:
        assert sup.run() == 0
        decisions = decided()
    finally:
        helper.join()
        reader.close()
    # (then the SIGTERM's shutdown, with its grace less two 30 s polls, kills it at once)
    assert (decisions[0]["to_state"], decisions[0]["pressure"]) == ("preempt", 90.0)
    # At the fire, not at the first poll after the start (30 s later).
    assert decisions[0]["at"] - litequeue.now() + time.monotonic() - fired_at[0] < 5
    assert time.monotonic() - t_run < 15
    assert queue.get(job_id).state == "queued"


# ======================================================================================
# Real memory stalls: a page-cache thrash in a small v1 memory cgroup below ours
# ======================================================================================

THRASH = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)   # its pages charged to this group
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    os.lseek(fd, 0, os.SEEK_SET)
    while os.read(fd, 1 << 20):
        pass
"""


def own_v1_memory_group():
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    directory = os.path.join("/sys/fs/cgroup/memory", path.lstrip("/"))
                    return directory if os.access(directory, os.W_OK) else None
    except OSError:
        pass
    return None


@pytest.fixture
def small_memory_group():
    """A fresh v1 memory cgroup of 32 MiB below our own, removed afterwards."""
    parent = own_v1_memory_group()
    if parent is None:
        pytest.skip("no writable cgroup v1 memory group of our own")
    group = os.path.join(parent, f"litequeue-test-psi-{os.getpid()}")
    os.mkdir(group)
    try:
        with open(os.path.join(group, "memory.limit_in_bytes"), "w") as f:
            f.write(str(32 * MiB))
        yield group
    finally:
        for _ in range(50):
            try:
                os.rmdir(group)
                break
            except OSError:
                time.sleep(0.1)


@needs_psi
def test_real_memory_stalls_fire_the_trigger(tmp_path, small_memory_group):
    """A process reading a 128 MiB file in a loop inside a 32 MiB group reclaims and
    refaults its page cache all the time: the machine's trigger fires for real."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(128):
            f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
    trigger = litequeue._PressureTrigger.open(PROC_PRESSURE)
    poller = select.poll()
    poller.register(trigger.fd, select.POLLPRI)
    proc = subprocess.Popen([sys.executable, "-c", THRASH, str(big), "15"],
                            preexec_fn=lambda: open(
                                os.path.join(small_memory_group, "cgroup.procs"), "w"
                            ).write(str(os.getpid())))
    try:
        t0 = time.monotonic()
        events = poller.poll(15_000)
        fired_after_s = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
        trigger.close()
    assert events and events[0][1] & select.POLLPRI, "no memory stall reported in 15 s"
    assert fired_after_s < 15
