"""Producers that wait (issue 11): `enqueue(..., wait=S)` and `enqueue --wait 30s` pause a
producer on a full queue until another process makes room, then enqueue; QueueFull (exit 3)
if the wait runs out. Nothing is dropped, and the waiting producer burns no CPU."""

import asyncio
import subprocess
import sys
import textwrap
import time

import pytest

import litequeue
from conftest import ROOT, run_cli

# A consumer in another process: it claims one job after `after_s`, and prints when.
DRAINER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import litequeue
    queue = litequeue.Queue({path!r})
    time.sleep({after_s!r})                 # the scenario: room comes only after a while
    (job,) = queue.claim("drainer")
    print(job.id, time.time(), flush=True)
""")


def start_drainer(path, after_s):
    code = DRAINER.format(root=ROOT, path=str(path), after_s=after_s)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def drained(drainer):
    """(id of the job claimed, when) once the drainer is done."""
    out, _ = drainer.communicate(timeout=30)
    assert drainer.returncode == 0
    job_id, at = out.split()
    return int(job_id), float(at)


@pytest.fixture
def full(db_path):
    """A queue of max_depth 2 holding two queued jobs."""
    queue = litequeue.Queue(db_path, max_depth=2)
    queue.enqueue("echo", {"n": 1})
    queue.enqueue("echo", {"n": 2})
    yield queue
    queue.close()


def test_a_waiting_enqueue_goes_in_once_another_process_makes_room(full):
    drainer = start_drainer(full.path, 0.5)
    job_id = full.enqueue("echo", {"n": 3}, wait=20)
    returned_at = time.time()
    claimed_id, claimed_at = drained(drainer)
    assert claimed_at <= returned_at                # it went in after the room was made
    assert returned_at - claimed_at < 0.6           # within one backoff step at most
    assert full.get(job_id).payload == {"n": 3}
    states = {job.payload["n"]: job.state for job in full.jobs(limit=None)}
    assert states == {1: "running", 2: "queued", 3: "queued"}     # nothing dropped


def test_a_waiting_producer_wakes_at_the_write_that_makes_room(full):
    """inotify on the file's directory: by 1.2 s the backoff is at 0.5 s, its next try
    ~0.4 s after the drain (measured 380 ms without the watch, 11-14 ms with it)."""
    drainer = start_drainer(full.path, 1.2)
    full.enqueue("echo", {"n": 3}, wait=20)
    returned_at = time.time()
    _, claimed_at = drained(drainer)
    assert 0 <= returned_at - claimed_at < 0.2


def test_a_wait_that_runs_out_raises_queue_full_and_burns_no_cpu(full):
    started, cpu_started = time.monotonic(), time.thread_time()
    with pytest.raises(litequeue.QueueFull, match="full"):
        full.enqueue("echo", {"n": 3}, wait=2)
    waited_s, cpu_s = time.monotonic() - started, time.thread_time() - cpu_started
    assert 2.0 <= waited_s < 3.0
    assert cpu_s < 0.05 * waited_s, f"{cpu_s:.3f}s of CPU in {waited_s:.2f}s of waiting"
    assert sorted(job.payload["n"] for job in full.jobs(limit=None)) == [1, 2]


@pytest.mark.parametrize("wait", [None, 0, "0s"])
def test_without_a_wait_a_full_queue_raises_at_once(full, wait):
    started = time.monotonic()
    with pytest.raises(litequeue.QueueFull):
        full.enqueue("echo", wait=wait)
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("wait", [-1, "soon", float("nan"), float("inf"), True, "-5s"])
def test_a_bad_wait_is_bad_input_and_enqueues_nothing(db_path, wait):
    with litequeue.Queue(db_path) as queue:
        with pytest.raises(litequeue.BadInput, match="wait"):
            queue.enqueue("echo", wait=wait)
        with pytest.raises(litequeue.BadInput, match="wait"):
            queue.enqueue_many(["echo"], wait=wait)
        assert queue.jobs() == []


def test_enqueue_many_waits_for_room_for_the_whole_batch(full):
    drainer = start_drainer(full.path, 0.3)
    with pytest.raises(litequeue.QueueFull):            # room for one, never for two
        full.enqueue_many(["echo", "echo"], wait=1.5)
    drained(drainer)
    ids = full.enqueue_many([("echo", {"n": 3})], wait=5)
    assert full.get(ids[0]).payload == {"n": 3}


def test_aenqueue_waits_without_blocking_the_event_loop(full):
    drainer = start_drainer(full.path, 0.5)

    async def main():
        ticks = 0
        waiting = asyncio.ensure_future(full.aenqueue("echo", {"n": 3}, wait=20))
        while not waiting.done():
            await asyncio.sleep(0.01)
            ticks += 1
        return await waiting, ticks

    job_id, ticks = asyncio.run(main())
    drained(drainer)
    assert full.get(job_id).payload == {"n": 3}
    assert ticks >= 20                  # the loop went on for the half second of waiting


def test_cli_enqueue_wait_goes_in_once_room_is_made(full):
    drainer = start_drainer(full.path, 0.5)
    result = run_cli("enqueue", "echo", "--payload", '{"n": 3}', "--wait", "30s",
                     db=full.path)
    drained(drainer)
    assert result.returncode == 0, result.stderr
    assert full.get(int(result.stdout)).payload == {"n": 3}


def test_cli_enqueue_wait_that_runs_out_exits_3_in_one_line(full):
    started = time.monotonic()
    result = run_cli("enqueue", "echo", "--wait", "1s", db=full.path)
    assert result.returncode == 3
    assert time.monotonic() - started >= 1.0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "full" in lines[0] and "1s" in lines[0], result.stderr
    assert len(full.jobs(limit=None)) == 2


def test_cli_enqueue_bad_wait_exits_2(full):
    result = run_cli("enqueue", "echo", "--wait", "later", db=full.path)
    assert result.returncode == 2
    assert "--wait: 'later' is not a duration" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
