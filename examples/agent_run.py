#!/usr/bin/env python3
"""An agent run: a long, talkative async task that survives memory pressure.

    python examples/agent_run.py          (from any directory)

The task `agent` works in steps, each a simulated model call (`await asyncio.sleep`). After
each step it streams a line of its transcript with `ctx.emit` (to the job's output file on
disk, never held in memory) and saves a checkpoint. This demo runs the real supervisor
(`python litequeue.py serve`) under a memory budget, follows the transcript live with
`python litequeue.py jobs output ID --follow` (as you would in a terminal), and, halfway
through, enqueues a `high` priority `hog` job that pushes memory pressure past 85 % of the
budget: the agent is asked to stop at its next checkpoint and goes back to `queued`. When the
hog ends, the agent resumes from its last checkpoint and finishes. The transcript shows both
attempts in order, each starting with its marker line.

As an app, this file is served like any other:

    python litequeue.py serve --app examples/agent_run.py --db queue.db
"""

import asyncio
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LITEQUEUE = os.path.join(ROOT, "litequeue.py")
sys.path.insert(0, ROOT)       # in your app, litequeue.py sits next to this file instead
import litequeue  # noqa: E402
from litequeue import Queue  # noqa: E402

MiB = 1 << 20
STEPS, STEP_S = 16, 0.25        # the agent: 16 model calls of a quarter second each

# Run as a script, the demo works on a fresh database in a temporary directory. Loaded by
# `serve --app`, it uses $LITEQUEUE_DB, else ./litequeue.db: the same default as --db.
demo_dir = None
if __name__ == "__main__" and not os.environ.get("LITEQUEUE_DB"):
    demo_dir = tempfile.mkdtemp(prefix="litequeue-agent-")
    os.environ["LITEQUEUE_DB"] = os.path.join(demo_dir, "queue.db")
queue = Queue(os.environ.get("LITEQUEUE_DB") or "litequeue.db")


async def call_model(prompt, step):
    """Stands for a model call: it takes a while and returns a short answer."""
    await asyncio.sleep(STEP_S)
    return f"thought {step}: {prompt.split()[0]} looks fine at depth {step}"


@queue.task(priority="normal", max_attempts=3)
async def agent(ctx, goal="review the report", steps=STEPS):
    """Work towards `goal` in steps, streaming a transcript and saving after every step."""
    state = ctx.checkpoint or {"step": 0, "thoughts": []}     # None on the first run
    if state["step"]:
        ctx.emit(f"[resuming at step {state['step'] + 1} of {steps}]\n")
    while state["step"] < steps:
        step = state["step"] + 1
        answer = await call_model(goal, step)
        ctx.emit(f"step {step:2d}/{steps}  {answer}\n")      # to the job's output, flushed
        state = {"step": step, "thoughts": (state["thoughts"] + [answer])[-3:]}
        ctx.progress(step, steps)
        ctx.save(state)            # durable; if a stop was asked, the job stops right here
    return {"goal": goal, "steps": steps, "last": state["thoughts"][-1]}


@queue.task(priority="high", max_attempts=1)
def hog(ctx, mb=100, seconds=4.0):
    """Hold `mb` MiB of real memory for a while: the pressure that preempts the agent."""
    block = bytearray(b"\x01") * (int(mb) * MiB)
    time.sleep(float(seconds))
    return {"held": len(block) // MiB}


# -- the demo ------------------------------------------------------------------------------

class DemoFailed(Exception):
    """Something the demo expected did not happen."""


def wait_for(what, predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise DemoFailed(f"timed out after {timeout:g}s waiting for {what}")


def tree_pss_bytes(pid):
    """PSS of a process and its children: what the supervisor weighs against its budget."""
    import psutil
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return 0
    return litequeue.process_pss_bytes(pid) + sum(
        litequeue.process_pss_bytes(child.pid) for child in children)


def follow(db, job_id, lines):
    """`litequeue.py jobs output ID --follow`, its lines printed and kept as they come."""
    proc = subprocess.Popen([sys.executable, LITEQUEUE, "jobs", "output", str(job_id),
                             "--follow", "--db", db], stdout=subprocess.PIPE, text=True)

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            print(f"    | {line.rstrip()}", flush=True)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return proc, reader


def main():
    db = os.environ["LITEQUEUE_DB"]
    print(f"An agent run in {db}")
    job_id = agent.enqueue(goal="review the quarterly report")
    print(f"\n1. A supervisor starts the agent (job {job_id}); we measure the memory of the "
          f"supervisor and\n   its child, then stop it with SIGTERM, as `systemctl stop` "
          f"would: the agent stops at its\n   next checkpoint, uncharged.")
    # Measure the tree with the agent running, then set the budget so that a hog of a few
    # dozen MiB takes pressure past the preempt level (85 %) but not to emergency (95 %).
    log_path = db + ".serve.log"
    log = open(log_path, "w")
    probe = subprocess.Popen([sys.executable, LITEQUEUE, "serve", "--db", db, "--app",
                              os.path.abspath(__file__), "--poll", "0.1"],
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for("the agent to start", lambda: queue.get(job_id).state == "running")
        time.sleep(0.5)
        base = tree_pss_bytes(probe.pid)
    finally:
        probe.terminate()
        probe.wait(timeout=30)
    budget_mib = math.ceil(base / MiB / 0.5)           # the tree at about 50 %
    hog_mib = max(8, int(0.40 * budget_mib))           # + 40 %: about 90 %
    print(f"\n2. They held {base / MiB:.0f} MiB, so we serve with --memory-budget "
          f"{budget_mib}M: a {hog_mib} MiB hog next to\n   them means about 90 % pressure, past "
          f"the preempt level (85 %). The transcript so far,\n   and the rest as it is "
          f"written:")
    lines = []
    serve = subprocess.Popen([sys.executable, LITEQUEUE, "serve", "--db", db, "--app",
                              os.path.abspath(__file__), "--poll", "0.1", "--memory-budget",
                              f"{budget_mib}M", "--hold", "1", "--grace", "5"],
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        print(f"\n$ python litequeue.py jobs output {job_id} --follow")
        follower, reader = follow(db, job_id, lines)
        wait_for("a few steps", lambda: (queue.get(job_id).checkpoint or {}).get("step", 0) >= 4)
        hog_id = hog.enqueue_with({"mb": hog_mib, "seconds": 3.0})
        print(f"    (enqueued a high-priority {hog_mib} MiB hog: job {hog_id})")
        wait_for("the agent to be preempted",
                 lambda: queue.get(job_id).preemptions >= 1, timeout=60)
        print("    (the agent was preempted at a checkpoint and went back to queued)")
        wait_for("the agent to finish", lambda: queue.get(job_id).state == "done", timeout=120)
        follower.wait(timeout=30)                      # --follow exits once the job is final
        reader.join(timeout=5)
    finally:
        serve.terminate()
        serve.wait(timeout=30)
        log.close()
    job = queue.get(job_id)
    transcript = queue.output(job_id).decode()
    steps = [line for line in transcript.splitlines() if line.startswith("step ")]
    resumed = [line for line in transcript.splitlines() if line.startswith("[resuming")]
    print(f"\n3. agent: {job.state}, {job.preemptions} preemption(s), attempts {job.attempts}, "
          f"result {job.result}")
    checks = {
        "done with its result": job.state == "done" and job.result["steps"] == STEPS,
        "preempted once at least": job.preemptions >= 1,
        "every step once, in order": steps == [s for s in steps if s] and [
            int(line.split()[1].split("/")[0]) for line in steps] == list(range(1, STEPS + 1)),
        "resumed where it stopped": bool(resumed),
        "followed live": any(line.startswith("step ") for line in lines),
    }
    for what, ok in checks.items():
        print(f"  {'ok ' if ok else 'NOT'} {what}")
    if not all(checks.values()):
        raise DemoFailed("the agent run did not go as it should; see the lines above")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except DemoFailed as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        code = 1
    finally:
        queue.close()
        if demo_dir is not None:
            shutil.rmtree(demo_dir, ignore_errors=True)
    sys.exit(code)
