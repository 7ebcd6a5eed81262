#!/usr/bin/env python3
"""litequeue benchmarks: our figures beside a comparison measured on the same machine, in
the same run, with the ratio and the target of each (issues 2-5).

This is a script, not a test: pytest does not collect it (no test_ file name, no test_
functions). Run it from anywhere:

    python tests/bench.py                   # everything (a few minutes on 2 cores)
    python tests/bench.py --quick           # smaller runs: a smoke test, under a minute
    python tests/bench.py --only enqueue    # one section: enqueue, supervisor, memory, retention
    python tests/bench.py --dir /mnt/sd     # put the database files on the device under test

Sections:
  enqueue     single enqueues (FULL and NORMAL) and enqueue_many beside raw apsw doing the
              same minimal SQL on a file with the same schema and pragmas; claim+complete on
              100k and 1M queued jobs beside raw apsw; `litequeue.py enqueue heartbeat` wall
              time beside `python -c pass` and `python -c "import apsw, click"`.
  supervisor  2,000 no-op jobs through `serve --burst --slots 2` beside bare fork+join two at a
              time; enqueue-to-start latency with an idle supervisor; idle RSS and CPU.
  memory      reaction time from pressure crossing the preempt threshold to the victim being
              signalled and gone, in a real run under --memory-budget; CPU cost of polling.
  retention   100,000 jobs through the queue with a short keep: file sizes stay bounded.

Nothing here changes litequeue: every figure goes through its public API or its CLI.
"""

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "litequeue.py")
SCHEMA = os.path.join(ROOT, "schema.sql")
sys.path.insert(0, ROOT)

import apsw  # noqa: E402
import psutil  # noqa: E402

import litequeue  # noqa: E402

PY = sys.executable
MiB = 1 << 20


# ======================================================================================
# Sizes of the runs
# ======================================================================================

FULL_RUN = dict(
    single_full=100, single_normal=300, single_rounds=15,
    many_batches=2, many_rounds=9,
    claim_sizes=(100_000, 1_000_000), claim_full=40, claim_normal=200, claim_rounds=15,
    cli_runs=20,
    sup_jobs=2000, latency_jobs=100, idle_s=30.0, fork_latency_n=100,
    reaction_runs=5, poll_calls=2000, idle_poll_s=10.0,
    soak_jobs=100_000, soak_purge_every=5000, soak_print_every=10_000,
)
QUICK_RUN = dict(
    single_full=30, single_normal=150, single_rounds=7,
    many_batches=1, many_rounds=3,
    claim_sizes=(10_000, 100_000), claim_full=30, claim_normal=100, claim_rounds=5,
    cli_runs=3,
    sup_jobs=150, latency_jobs=15, idle_s=4.0, fork_latency_n=20,
    reaction_runs=1, poll_calls=300, idle_poll_s=3.0,
    soak_jobs=10_000, soak_purge_every=1000, soak_print_every=2000,
)
SECTIONS = ("enqueue", "supervisor", "memory", "retention")


# ======================================================================================
# Output: one table per section
# ======================================================================================

class Table:
    """Rows of (metric, ours, comparison, ratio, target, verdict), printed aligned."""

    HEAD = ("metric", "litequeue", "comparison", "ratio", "target", "")

    def __init__(self, title, notes=()):
        self.title, self.notes, self.rows = title, list(notes), []

    def row(self, metric, ours, comparison="", ratio="", target="", ok=None):
        verdict = "" if ok is None else ("PASS" if ok else "FAIL")
        self.rows.append((metric, ours, comparison, ratio, target, verdict))
        return ok

    def note(self, text):
        self.notes.append(text)

    def render(self):
        cells = [self.HEAD] + [tuple(str(c) for c in r) for r in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.HEAD))]
        lines = [f"== {self.title} =="]
        for index, r in enumerate(cells):
            parts = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in (1, 2, 3)] + [
                r[4].ljust(widths[4]), r[5]]
            lines.append("  ".join(parts).rstrip())
            if index == 0:
                lines.append("  ".join("-" * w for w in widths).rstrip())
        lines += [f"   * {text}" for text in self.notes]
        return "\n".join(lines)

    def as_dict(self):
        return {"title": self.title, "notes": self.notes,
                "rows": [dict(zip(("metric", "litequeue", "comparison", "ratio", "target",
                                   "verdict"), r)) for r in self.rows]}


def pct(x):
    return f"{100 * x:.0f}%"


def rate(x, unit="/s"):
    return f"{x:,.0f}{unit}" if x >= 100 else f"{x:,.1f}{unit}"


def ms(seconds):
    return f"{1000 * seconds:.1f} ms"


def mb(n):
    return f"{n / MiB:.1f} MiB"


def percentile(values, p):
    """Linear interpolation between closest ranks (numpy's default)."""
    data = sorted(values)
    if not data:
        return float("nan")
    k = (len(data) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def say(text):
    """Progress on stderr, so stdout carries only the tables."""
    print(f"  .. {text}", file=sys.stderr, flush=True)


# ======================================================================================
# Files and processes
# ======================================================================================

class Bench:
    def __init__(self, args):
        self.quick = args.quick
        self.n = QUICK_RUN if args.quick else FULL_RUN
        self.dir = tempfile.mkdtemp(prefix="lqbench-", dir=args.dir)
        self.keep_files = args.keep_files
        self.tables = []

    def path(self, name):
        path = os.path.join(self.dir, name)
        remove_db(path)
        return path

    def cleanup(self):
        if self.keep_files:
            print(f"(files kept in {self.dir})", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def remove_db(path):
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)


def file_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


@contextlib.contextmanager
def serving(args, log_path, env=None):
    """A real `python litequeue.py serve ARGS` in the background, stopped on the way out."""
    log = open(log_path, "w")
    proc = subprocess.Popen([PY, SCRIPT, "serve", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=log, cwd=os.path.dirname(log_path),
                            env={**os.environ, **(env or {})})
    try:
        yield proc
    finally:
        stop_process(proc)
        log.close()


def stop_process(proc, grace=15.0):
    """SIGTERM, a second SIGTERM (stop at once) after a moment, SIGKILL as a last resort."""
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(1.0)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def wait_until(predicate, timeout, interval=0.005, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")


def log_tail(path, lines=5):
    with contextlib.suppress(OSError):
        with open(path) as f:
            return "".join(f.readlines()[-lines:])
    return ""


# ======================================================================================
# The machine
# ======================================================================================

def machine_header(bench):
    def cpu_model():
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        return platform.processor() or "?"

    def version(dist):
        try:
            from importlib.metadata import version as v
            return v(dist)
        except Exception:
            return "?"

    def git(*args):
        try:
            return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                                  timeout=5).stdout.strip()
        except Exception:
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "?"
    dirty = " (litequeue.py modified)" if git("status", "--porcelain", "litequeue.py") else ""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    fs = "?"
    with contextlib.suppress(Exception):
        best = ""
        for part in psutil.disk_partitions(all=True):
            if bench.dir.startswith(part.mountpoint) and len(part.mountpoint) > len(best):
                best, fs = part.mountpoint, f"{part.fstype} on {part.device} ({part.mountpoint})"
    memory = psutil.virtual_memory()
    lines = [
        "litequeue benchmark" + (" (--quick: smaller runs, figures are indicative only)"
                                 if bench.quick else ""),
        f"machine : {cpus} CPUs (nproc), {cpu_model()}, {memory.total / (1 << 30):.1f} GiB RAM,"
        f" load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"system  : {platform.platform()}",
        f"python  : {platform.python_version()} ({PY})",
        f"sqlite  : {apsw.sqlite_lib_version()}, apsw {apsw.apsw_version()}, psutil "
        f"{version('psutil')}, click {version('click')}",
        f"litequeue: {litequeue.__version__} at {ROOT}, git {commit}{dirty}",
        f"files   : {bench.dir} on {fs}",
        f"env     : PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '(unset)')}",
    ]
    return "\n".join(lines)


# ======================================================================================
# 1. enqueue / claim: litequeue beside raw apsw
# ======================================================================================

RAW_INSERT = ("INSERT INTO jobs (task, payload, priority, state, max_attempts, shed, created_at,"
              " due_at) VALUES (?, ?, 2, 'queued', 3, 0, ?, ?)")
RAW_NEXT = ("SELECT id FROM jobs WHERE state = 'queued' AND due_at <= ?"
            " ORDER BY priority, due_at, id LIMIT 1")
RAW_RUNNING = ("UPDATE jobs SET state = 'running', owner = ?, started_at = ?,"
               " attempts = attempts + 1 WHERE id = ?")
RAW_DONE = ("UPDATE jobs SET state = 'done', result = ?, finished_at = ?, owner = NULL"
            " WHERE id = ? AND state = 'running' AND owner = ?")


def raw_connection(path, durable, create=False):
    """What a careful hand-written apsw queue would open: WAL, the same synchronous setting,
    busy timeout and WAL size limit as litequeue; with create, litequeue's own schema.sql, so
    the jobs table and its indexes are the same."""
    conn = apsw.Connection(path)
    conn.set_busy_timeout(10_000)
    if create:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
    conn.execute("PRAGMA journal_size_limit = 4194304")
    if create:
        with open(SCHEMA) as f:
            conn.execute(f.read())
    return conn


def lq_single(queue, n, start):
    t0 = time.perf_counter()
    for i in range(start, start + n):
        queue.enqueue("echo", {"i": i})
    return n / (time.perf_counter() - t0)


def raw_single(conn, n, start):
    t0 = time.perf_counter()
    for i in range(start, start + n):
        at = time.time()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(RAW_INSERT, ("echo", json.dumps({"i": i}), at, at))
        conn.execute("COMMIT")
    return n / (time.perf_counter() - t0)


def lq_many(queue, batches, start):
    t0 = time.perf_counter()
    for b in range(batches):
        base = start + b * 1000
        queue.enqueue_many([("echo", {"i": base + i}) for i in range(1000)])
    return batches * 1000 / (time.perf_counter() - t0)


def raw_many(conn, batches, start):
    t0 = time.perf_counter()
    for b in range(batches):
        base = start + b * 1000
        at = time.time()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(RAW_INSERT, [("echo", json.dumps({"i": base + i}), at, at)
                                      for i in range(1000)])
        conn.execute("COMMIT")
    return batches * 1000 / (time.perf_counter() - t0)


def paired(rounds, ours, theirs):
    """Many short rounds, alternating which side goes first, so that load from elsewhere on
    the machine and cache warmth hit both sides alike. Returns (median of our rates, median
    of theirs, median of the per-round ratios): the ratio of adjacent runs is what resists
    a noisy machine best."""
    a, b = [], []
    for r in range(rounds):
        if r % 2 == 0:
            a.append(ours(r))
            b.append(theirs(r))
        else:
            b.append(theirs(r))
            a.append(ours(r))
    return (statistics.median(a), statistics.median(b),
            statistics.median(x / y for x, y in zip(a, b)))


def prefill(path, n):
    """A litequeue file holding n due 'echo' jobs, written fast in one raw transaction."""
    litequeue.Queue(path).close()
    conn = apsw.Connection(path)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -262144")
    at = time.time()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(RAW_INSERT, (("echo", '{"i": %d}' % i, at, at - n * 1e-3 + i * 1e-3)
                                  for i in range(n)))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    conn.execute("ANALYZE")
    conn.close()


def lq_claim_complete(queue, n):
    """n claim+complete pairs through the public API; returns (pairs/s, claims/s)."""
    owner = "bench"
    claim_s = 0.0
    t0 = time.perf_counter()
    for _ in range(n):
        c0 = time.perf_counter()
        job = queue.claim(owner)[0]
        claim_s += time.perf_counter() - c0
        queue.complete(job.id, owner, job.attempts)
    return n / (time.perf_counter() - t0), n / claim_s


def raw_claim_complete(conn, n):
    """The minimal SQL: select the next due job by (priority, due, id) on the same partial
    index, mark it running (one transaction), mark it done (another)."""
    owner = "raw"
    claim_s = 0.0
    t0 = time.perf_counter()
    for _ in range(n):
        c0 = time.perf_counter()
        at = time.time()
        conn.execute("BEGIN IMMEDIATE")
        job_id = conn.execute(RAW_NEXT, (at,)).fetchall()[0][0]
        conn.execute(RAW_RUNNING, (owner, at, job_id))
        conn.execute("COMMIT")
        claim_s += time.perf_counter() - c0
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(RAW_DONE, ("null", time.time(), job_id, owner))
        conn.execute("COMMIT")
    return n / (time.perf_counter() - t0), n / claim_s


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cli_timings(runs, cwd, db, env):
    commands = {
        "pass": [PY, "-c", "pass"],
        "import": [PY, "-c", "import apsw, click"],
        "enqueue": [PY, SCRIPT, "enqueue", "heartbeat", "--db", db],
        "module": [PY, "-m", "litequeue", "enqueue", "heartbeat", "--db", db],
    }
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))}
    times = {name: [] for name in commands}
    for name, command in commands.items():           # warm the page cache and any pyc cache
        subprocess.run(command, cwd=cwd, env=env, capture_output=True, check=True)
    for _ in range(runs):
        for name, command in commands.items():
            t0 = time.perf_counter()
            done = subprocess.run(command, cwd=cwd, env=env, capture_output=True)
            times[name].append(time.perf_counter() - t0)
            if done.returncode != 0:
                raise RuntimeError(f"{command} failed: {done.stderr.decode()[-500:]}")
    return {name: statistics.median(values) for name, values in times.items()}


def section_enqueue(bench):
    n = bench.n
    t = Table("1. enqueue and claim: litequeue beside raw apsw (same schema.sql, same pragmas)")
    t.note("raw apsw: one INSERT per BEGIN IMMEDIATE/COMMIT; executemany of 1000 in one "
           "transaction; claim = SELECT next by (priority, due_at, id) on jobs_claim + UPDATE "
           "to running, then UPDATE to done, each its own transaction; no events rows")
    t.note("litequeue: Queue.enqueue('echo', {'i': i}) by name; enqueue_many of 1000; "
           "Queue.claim(owner) + Queue.complete(id, owner, attempts); with its events rows")
    t.note(f"rates: medians of {n['single_rounds']} (enqueue), {n['many_rounds']} "
           f"(enqueue_many), {n['claim_rounds']} (claim) short rounds, alternating sides; "
           f"ratio: median of the per-round ratios")

    # -- single enqueues and enqueue_many, under FULL and NORMAL --------------------------
    for durable, label, count in ((True, "FULL", n["single_full"]),
                                  (False, "NORMAL", n["single_normal"])):
        say(f"single enqueue, {label}")
        queue = litequeue.Queue(bench.path(f"enq-{label}.db"), durable=durable)
        raw = raw_connection(bench.path(f"raw-{label}.db"), durable, create=True)
        lq_single(queue, 50, 0), raw_single(raw, 50, 0)           # warm up both
        ours, theirs, ratio = paired(n["single_rounds"],
                                     lambda r: lq_single(queue, count, r * count),
                                     lambda r: raw_single(raw, count, r * count))
        need = 0.80 if durable else 0.40
        t.row(f"single enqueue, {label} (jobs/s)", rate(ours), f"raw {rate(theirs)}",
              pct(ratio), f">= {need:.0%} of raw", ratio >= need)

        say(f"enqueue_many, {label}")
        start = 10_000_000
        ours, theirs, ratio = paired(
            n["many_rounds"], lambda r: lq_many(queue, n["many_batches"], start + r * 100_000),
            lambda r: raw_many(raw, n["many_batches"], start + r * 100_000))
        t.row(f"enqueue_many x1000, {label} (jobs/s)", rate(ours), f"raw {rate(theirs)}",
              pct(ratio), "(no target)")
        queue.close()
        raw.close()

    # -- claim + complete on a big queue -------------------------------------------------
    # Both sizes prefilled first, then every round runs all four (litequeue and raw, small
    # and big file) back to back in a rotating order, so that the 100k/1M comparison and the
    # litequeue/raw comparison are both made between adjacent runs.
    small, big = n["claim_sizes"]
    paths = {}
    for size in (small, big):
        say(f"prefill {size:,} jobs")
        paths[size] = bench.path(f"claim-{size}.db")
        t0 = time.perf_counter()
        prefill(paths[size], size)
        say(f"prefilled in {time.perf_counter() - t0:.1f}s, {file_size(paths[size]) / MiB:.0f} MiB")
    scaling = {}
    for durable, label, count in ((True, "FULL", n["claim_full"]),
                                  (False, "NORMAL", n["claim_normal"])):
        say(f"claim+complete at {small:,} and {big:,}, {label}")
        sides = {}
        for size in (small, big):
            queue = litequeue.Queue(paths[size], durable=durable)
            raw = raw_connection(paths[size], durable)
            lq_claim_complete(queue, 100), raw_claim_complete(raw, 100)     # warm up
            sides[("lq", size)] = (lambda q=queue: lq_claim_complete(q, count), queue)
            sides[("raw", size)] = (lambda c=raw: raw_claim_complete(c, count), raw)
        results = {key: [] for key in sides}
        order = list(sides)
        for r in range(n["claim_rounds"]):
            for key in order[r % 4:] + order[:r % 4]:
                results[key].append(sides[key][0]())
        for _, handle in sides.values():
            handle.close()
        for size in (small, big):
            lq, raw = results[("lq", size)], results[("raw", size)]
            ratio = statistics.median(a[0] / b[0] for a, b in zip(lq, raw))
            t.row(f"claim+complete, {size:,} queued, {label} (pairs/s)",
                  rate(statistics.median(a[0] for a in lq)),
                  f"raw {rate(statistics.median(b[0] for b in raw))}", pct(ratio),
                  ">= 50% of raw", ratio >= 0.5)
        scaling[label] = tuple(
            (statistics.median(a[1] for a in results[(who, big)]),
             statistics.median(a[1] for a in results[(who, small)]),
             statistics.median(a[1] / b[1] for a, b in zip(results[(who, big)],
                                                            results[(who, small)])))
            for who in ("lq", "raw"))
    for label in ("FULL", "NORMAL"):
        (ours_big, ours_small, ratio), (_, _, raw_ratio) = scaling[label]
        t.row(f"claims/s, {big // 1000:,}k vs {small // 1000:,}k queued, {label}",
              f"{rate(ours_big)} vs {rate(ours_small)}", f"raw {pct(raw_ratio)}", pct(ratio),
              ">= 80% (within 20%)", ratio >= 0.8)
    for path in paths.values():
        remove_db(path)
    t.note("claims/s: the claim transaction alone (Queue.claim; raw: SELECT + UPDATE + COMMIT) "
           "timed inside the claim+complete rounds; each round runs litequeue and raw on both "
           "files back to back, in a rotating order")

    # -- the cron command's start-up ------------------------------------------------------
    db = bench.path("cli.db")
    litequeue.Queue(db).close()
    variants = [("this env", dict(os.environ))]
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = os.path.join(bench.dir, "pycache")
        variants.append(("pyc cache on", env))
        t.note("CLI 'this env': PYTHONDONTWRITEBYTECODE is set here, so no .pyc is ever "
               "written and modules are compiled from source on every run; 'pyc cache on': "
               "Python's default (PYTHONPYCACHEPREFIX in the bench dir), what cron on a device "
               "gets")
    for what, env in variants:
        say(f"CLI start-up, {what}")
        med = cli_timings(n["cli_runs"], bench.dir, db, env)
        ratio = med["enqueue"] / med["import"]
        t.row(f"`litequeue.py enqueue heartbeat`, {what}", ms(med["enqueue"]),
              f"import apsw, click {ms(med['import'])}", f"{ratio:.2f}x", "< 1.5x", ratio < 1.5)
        t.row(f"   beside `python -c pass`, {what}", "", f"pass {ms(med['pass'])}",
              f"{med['enqueue'] / med['pass']:.2f}x")
        t.row(f"   `python -m litequeue enqueue heartbeat`, {what}", ms(med["module"]),
              f"import apsw, click {ms(med['import'])}", f"{med['module'] / med['import']:.2f}x")
    with open(SCRIPT) as f:
        source = f.read()
    compile_s = min(timed(lambda: compile(source, SCRIPT, "exec")) for _ in range(5))
    t.note(f"compiling litequeue.py ({len(source) // 1024} KiB) takes {ms(compile_s)} here: "
           f"`python litequeue.py` pays it on every run (a script is never read from a .pyc); "
           f"`python -m litequeue` and the installed `litequeue` command do not")
    t.note(f"CLI: median wall time of {n['cli_runs']} runs each, interleaved; the heartbeat is "
           f"unique, so every run after the first finds the waiting one (cron with no "
           f"supervisor running)")
    return t


# ======================================================================================
# 2. supervisor: throughput, latency, idle cost
# ======================================================================================

FORK_CEILING = textwrap.dedent("""
    import multiprocessing, sys, time
    from multiprocessing.connection import wait
    def noop():
        pass
    if __name__ == "__main__":
        if len(sys.argv) > 2:       # a parent of the supervisor's size: the same modules loaded
            sys.path.insert(0, sys.argv[2])
            import apsw, click, ctypes, logging, psutil, litequeue
        ctx = multiprocessing.get_context("fork")
        n, slots = int(sys.argv[1]), 2
        running, started = [], 0
        t0 = time.perf_counter()
        while started < n or running:
            while started < n and len(running) < slots:
                p = ctx.Process(target=noop)
                p.start()
                running.append(p)
                started += 1
            wait([p.sentinel for p in running])
            for p in [p for p in running if p.exitcode is not None]:
                p.join()
                p.close()
                running.remove(p)
        print(n / (time.perf_counter() - t0))
""")

FORK_LATENCY = textwrap.dedent("""
    import multiprocessing, sys, time
    def stamp(conn):
        conn.send(time.time())
    if __name__ == "__main__":
        ctx = multiprocessing.get_context("fork")
        out = []
        for _ in range(int(sys.argv[1])):
            a, b = ctx.Pipe()
            t0 = time.time()
            p = ctx.Process(target=stamp, args=(b,))
            p.start()
            out.append(a.recv() - t0)
            p.join()
            p.close()
            time.sleep(0.01)
        print(" ".join(map(repr, out)))
""")

IDLE_BASELINE = "import apsw, click, psutil, time; time.sleep(60)"

STAMP_APP = """
import sys, time
sys.path.insert(0, {root!r})
from litequeue import Queue

queue = Queue({db!r})


@queue.task(max_attempts=1)
def stamp(ctx):
    return {{"t": time.time()}}
"""


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_fork_ceiling(n, loaded=False):
    """(jobs/s from start to exit, CPU seconds per job of the process and its children)."""
    c0, t0 = children_cpu(), time.perf_counter()
    subprocess.run([PY, "-c", FORK_CEILING, str(n), *([ROOT] if loaded else [])],
                   capture_output=True, text=True, check=True)
    return n / (time.perf_counter() - t0), (children_cpu() - c0) / n


def run_burst(bench, n_jobs, durability):
    """(jobs/s from start to exit, CPU seconds per job of serve and its children)."""
    db = bench.path(f"burst-{durability}.db")
    queue = litequeue.Queue(db)
    for start in range(0, n_jobs, 1000):
        queue.enqueue_many([("echo", {"i": i}) for i in range(start, min(n_jobs, start + 1000))])
    queue.close()
    args = ["serve", "--burst", "--slots", "2", "--db", db]
    if durability == "normal":
        args += ["--durability", "normal"]
    log_path = db + ".log"
    with open(log_path, "w") as log:
        c0, t0 = children_cpu(), time.perf_counter()
        proc = subprocess.run([PY, SCRIPT, *args], stdout=subprocess.DEVNULL, stderr=log,
                              cwd=bench.dir, timeout=1800)
        wall, cpu = time.perf_counter() - t0, children_cpu() - c0
    queue = litequeue.Queue(db)
    counts = queue.stats()["jobs"]
    queue.close()
    if proc.returncode != 0 or counts["done"] != n_jobs:
        raise RuntimeError(f"serve --burst exited {proc.returncode} with {counts}; log tail:\n"
                           f"{log_tail(log_path)}")
    return n_jobs / wall, cpu / n_jobs


def idle_rss_baseline():
    proc = subprocess.Popen([PY, "-c", IDLE_BASELINE])
    try:
        time.sleep(1.5)
        return psutil.Process(proc.pid).memory_info().rss
    finally:
        proc.kill()
        proc.wait()


def section_supervisor(bench):
    n = bench.n
    t = Table("2. supervisor: one forked child per job")
    jobs = n["sup_jobs"]

    # -- throughput -----------------------------------------------------------------------
    # fork ceiling, serve FULL, fork ceiling, serve NORMAL, fork ceiling: each serve run is
    # compared with the mean of the ceilings measured just before and just after it.
    say(f"fork ceiling, {jobs} no-op processes two at a time")
    ceilings = [run_fork_ceiling(jobs)]
    for durability in ("full", "normal"):
        say(f"{jobs} echo jobs through serve --burst --slots 2, durability {durability}")
        ours, ours_cpu = run_burst(bench, jobs, durability)
        say(f"fork ceiling, {jobs} no-op processes two at a time")
        ceilings.append(run_fork_ceiling(jobs))
        ceiling = statistics.mean(c[0] for c in ceilings[-2:])
        ceiling_cpu = statistics.mean(c[1] for c in ceilings[-2:])
        t.row(f"{jobs:,} no-op jobs, serve --burst, {durability.upper()} (jobs/s)", rate(ours),
              f"fork {rate(ceiling)}", pct(ours / ceiling), ">= 60% of fork",
              ours / ceiling >= 0.6)
        t.row(f"   CPU per job, all processes, {durability.upper()}", ms(ours_cpu),
              f"fork {ms(ceiling_cpu)}", f"{ours_cpu / ceiling_cpu:.1f}x", "")
    say("fork ceiling from a parent with litequeue's modules loaded")
    loaded, loaded_cpu = run_fork_ceiling(jobs, loaded=True)
    t.row("   fork ceiling from a parent with litequeue's imports", "", f"fork {rate(loaded)}",
          "", "")
    t.row("   its CPU per job", "", ms(loaded_cpu), "", "")
    t.note("fork ceiling: a fresh `python -c` forking and joining no-op multiprocessing "
           "children two at a time, timed like serve from start to exit; measured before and "
           "after each serve run. CPU per job: user+sys of the process and all its children "
           "(getrusage), which the machine's other load disturbs far less than the rate")
    t.note("serve: jobs pre-enqueued, timed from process start to exit, logging at the default "
           "level to a file; for scale, RQ's fork-per-job worker does about 53 jobs/s on this "
           "kind of machine")

    # -- latency and idle cost ------------------------------------------------------------
    db = bench.path("latency.db")
    app = os.path.join(bench.dir, "stamp_app.py")
    with open(app, "w") as f:
        f.write(STAMP_APP.format(root=ROOT, db=db))
    say("fork start latency (the floor)")
    out = subprocess.run([PY, "-c", FORK_LATENCY, str(n["fork_latency_n"])], capture_output=True,
                         text=True, check=True)
    fork_lat = [float(x) for x in out.stdout.split()]
    queue = litequeue.Queue(db)
    with serving(["--app", app, "--db", db], db + ".log") as proc:
        wait_until(lambda: queue.live_supervisors() or proc.poll() is not None, 30,
                   what="the supervisor to register")
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited {proc.returncode}: {log_tail(db + '.log')}")
        time.sleep(1.0)
        say(f"enqueue-to-start latency, {n['latency_jobs']} jobs one at a time")
        to_claim, to_run = [], []
        for i in range(n["latency_jobs"]):
            job_id = queue.enqueue("stamp")
            returned = time.time()
            job = wait_until(lambda: (lambda j: j if j.state in litequeue.FINAL_STATES else None)(
                queue.get(job_id)), 30, what=f"job {job_id}")
            if job.state != "done":
                raise RuntimeError(f"stamp job {job_id} ended {job.state}: {job.error}")
            to_claim.append(job.started_at - returned)
            to_run.append(job.result["t"] - returned)
            time.sleep(0.05 + 0.1 * ((i * 7919) % 100) / 100)   # gaps of 50-150 ms
        p50, p99 = percentile(to_run, 50), percentile(to_run, 99)
        fork50 = percentile(fork_lat, 50)
        t.row("enqueue -> task running, p50 (idle supervisor)", ms(p50),
              f"bare fork {ms(fork50)}", f"{p50 / fork50:.1f}x", "< 20 ms", p50 < 0.020)
        t.row("enqueue -> task running, p99", ms(p99),
              f"bare fork {ms(percentile(fork_lat, 99))}", "", "(no target)")
        t.row("enqueue -> claimed (started_at), p50 / p99",
              f"{ms(percentile(to_claim, 50))} / {ms(percentile(to_claim, 99))}", "", "", "")
        t.note(f"latency: {n['latency_jobs']} jobs enqueued one at a time from this process "
               f"(FULL), each after the last finished plus a 50-150 ms gap; measured from "
               f"enqueue() returning to the time.time() the task returns (and to the job's "
               f"started_at); bare fork = Process.start() to the child's first statement")

        say(f"idle supervisor RSS and CPU over {n['idle_s']:g}s")
        time.sleep(2.0)
        sup = psutil.Process(proc.pid)
        cpu0, wall0 = sup.cpu_times(), time.monotonic()
        rss_max = 0
        while time.monotonic() - wall0 < n["idle_s"]:
            rss_max = max(rss_max, sup.memory_info().rss)
            time.sleep(0.5)
        cpu1, wall1 = sup.cpu_times(), time.monotonic()
        cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (wall1 - wall0)
        pss = sup.memory_full_info().pss
        baseline = idle_rss_baseline()
        t.row("idle supervisor RSS (max over the window)", mb(rss_max),
              f"bare python+apsw+click+psutil {mb(baseline)}", f"{rss_max / baseline:.2f}x",
              "< 30 MiB", rss_max < 30 * MiB)
        t.row("idle supervisor PSS", mb(pss), "", "", "")
        t.row(f"idle supervisor CPU over {n['idle_s']:g}s (% of one core)", f"{100 * cpu:.2f}%",
              "", "", "< 1%", cpu < 0.01)
    queue.close()
    return t


# ======================================================================================
# 3. memory: reaction time and the cost of polling
# ======================================================================================

class TreeWatcher(threading.Thread):
    """Samples the supervisor tree's PSS (the supervisor's own measure) every few ms, and
    whether the victim still holds memory."""

    def __init__(self, sup_pid, victim_pid, interval=0.005):
        super().__init__(daemon=True)
        self.sup, self.victim, self.interval = psutil.Process(sup_pid), victim_pid, interval
        self.samples = []                 # (time, tree bytes, victim rss or None)
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                pids = [self.sup.pid] + [c.pid for c in self.sup.children()]
            except psutil.Error:
                break
            tree = sum(litequeue.process_pss_bytes(pid) for pid in pids)
            victim = litequeue.process_rss_bytes(self.victim)
            self.samples.append((time.time(), tree, victim))
            time.sleep(self.interval)


PROBE_COST = textwrap.dedent("""
    import json, multiprocessing, os, sys, time
    sys.path.insert(0, sys.argv[1])
    import litequeue, psutil
    def sleeper():
        time.sleep(600)
    if __name__ == "__main__":
        calls = int(sys.argv[2])
        ctx = multiprocessing.get_context("fork")
        kids = [ctx.Process(target=sleeper, daemon=True) for _ in range(2)]
        for kid in kids:
            kid.start()
        time.sleep(0.5)
        pids = [kid.pid for kid in kids]
        def cost(fn):
            for _ in range(20):
                fn()
            c0 = time.process_time()
            for _ in range(calls):
                fn()
            return (time.process_time() - c0) / calls
        def naive():
            psutil.virtual_memory()
            for pid in [os.getpid()] + pids:
                psutil.Process(pid).memory_full_info()
        plain, budget = litequeue.MemoryProbe(), litequeue.MemoryProbe(1 << 30)
        out = {"none": cost(lambda: plain.read(pids)), "budget": cost(lambda: budget.read(pids)),
               "naive": cost(naive)}
        for kid in kids:
            kid.kill()
            kid.join()
        print(json.dumps(out))
""")


def tree_pss(sup_pid):
    sup = psutil.Process(sup_pid)
    pids = [sup_pid] + [c.pid for c in sup.children()]
    return sum(litequeue.process_pss_bytes(pid) for pid in pids), pids


def chunked_running(queue, job_id):
    job = queue.get(job_id)
    return job.state == "running" and job.checkpoint is not None


def calibrate(bench):
    """Tree PSS with the supervisor running one chunked job and no pressure, so the budget
    can put the hog's tree at ~90% (preempt, well clear of emergency at 95%)."""
    db = bench.path("calibrate.db")
    queue = litequeue.Queue(db)
    with serving(["--db", db, "--memory-budget", "64G"], db + ".log") as proc:
        job_id = queue.enqueue("chunked", {"chunks": 400, "chunk_s": 0.05})
        wait_until(lambda: chunked_running(queue, job_id), 30, what="the chunked job to run")
        time.sleep(0.5)
        tree, pids = tree_pss(proc.pid)
        child = litequeue.process_pss_bytes(pids[-1]) if len(pids) > 1 else 10 * MiB
    queue.close()
    return tree, child


def reaction_run(bench, budget, hog_mb, preempt_at):
    db = bench.path("reaction.db")
    queue = litequeue.Queue(db)
    result = {}
    with serving(["--db", db, "--memory-budget", str(budget), "--grace", "5"],
                 db + ".log") as proc:
        low = queue.enqueue("chunked", {"chunks": 400, "chunk_s": 0.05})
        wait_until(lambda: chunked_running(queue, low), 30, what="the chunked job to run")
        time.sleep(0.5)
        children = psutil.Process(proc.pid).children()
        if len(children) != 1:
            raise RuntimeError(f"expected one child (the chunked job), found {children}")
        watcher = TreeWatcher(proc.pid, children[0].pid)
        watcher.start()
        time.sleep(0.1)
        t_enqueue = time.time()
        queue.enqueue("hog", {"mb": hog_mb, "seconds": 4}, priority="high")

        def requeued():
            return [e for e in queue.events(job_id=low)
                    if e["from_state"] == "running" and e["to_state"] == "queued"]
        try:
            requeue = wait_until(requeued, 20, interval=0.02, what="the chunked job's requeue")[0]
        finally:
            time.sleep(0.1)
            watcher.done.set()
            watcher.join()
        events = [e for e in queue.events(limit=100_000) if e["at"] >= t_enqueue]
        levels = [e for e in events if e["kind"] == "level"]
        decision = [e for e in events if e["kind"] == "decision" and e["job_id"] == low
                    and e["to_state"] in ("preempt", "kill")]
        reached = [e for e in levels if e["to_state"] in ("preempt", "emergency")]
        if not reached or not decision:
            raise RuntimeError(f"no preempt level/decision recorded: {events}")
        cross = next((s for s in watcher.samples if 100.0 * s[1] / budget >= preempt_at), None)
        signal_at = decision[0]["at"]
        freed = next((s for s in watcher.samples if s[0] >= signal_at and not s[2]), None)
        result = {
            "level": reached[0]["to_state"],
            "levels": [e["to_state"] for e in levels],
            "pressure": reached[0]["pressure"],
            "peak": 100.0 * max(s[1] for s in watcher.samples) / budget,
            "cross": cross[0] if cross else None,
            "level_at": reached[0]["at"],
            "signal_at": signal_at,
            "freed_at": freed[0] if freed else None,
            "requeue_at": requeue["at"],
            "decision": decision[0]["to_state"],
            "t_enqueue": t_enqueue,
        }
    queue.close()
    return result


def section_memory(bench):
    n = bench.n
    t = Table("3. memory governor: reaction time at the default poll, cost of polling")
    poll_s = 0.25
    preempt_at = 85.0

    # -- reaction time --------------------------------------------------------------------
    machine = litequeue.MemoryProbe().machine_percent()
    if machine > 60:
        t.note(f"machine memory already at {machine:.0f}%: reaction run skipped")
    else:
        hog_mb = 300
        say("calibrating the tree's PSS with a chunked job running")
        tree, child = calibrate(bench)
        budget = int((tree + hog_mb * MiB + child) / 0.90)
        runs = []
        for i in range(n["reaction_runs"]):
            say(f"reaction run {i + 1}/{n['reaction_runs']} (budget {mb(budget)}, "
                f"high hog {hog_mb} MiB beside a low chunked job)")
            r = reaction_run(bench, budget, hog_mb, preempt_at)
            if r["level"] == "emergency" and i == 0:
                budget = int(budget * 1.08)
                t.note("first run reached emergency; budget raised by 8% and run again")
                r = reaction_run(bench, budget, hog_mb, preempt_at)
            runs.append(r)
        usable = [r for r in runs if r["cross"] is not None]
        if not usable:
            raise RuntimeError(f"the watcher never saw pressure cross {preempt_at}%: {runs}")

        def stat(key_from, key_to):
            values = [r[key_to] - r[key_from] for r in usable
                      if r[key_to] is not None and r[key_from] is not None]
            return statistics.median(values), max(values)

        det50, det_max = stat("cross", "level_at")
        sig50, sig_max = stat("cross", "signal_at")
        fre50, fre_max = stat("cross", "freed_at")
        req50, req_max = stat("cross", "requeue_at")
        gone50, gone_max = stat("signal_at", "freed_at")
        t.row("crossing 85% -> victim signalled (median / max)", f"{ms(sig50)} / {ms(sig_max)}",
              f"2 polls {ms(2 * poll_s)}", pct(sig_max / (2 * poll_s)), "<= 2 poll intervals",
              sig_max <= 2 * poll_s)
        t.row("crossing 85% -> level 'preempt' recorded", f"{ms(det50)} / {ms(det_max)}",
              f"1 poll {ms(poll_s)}", "", "")
        t.row("victim signalled -> victim's memory freed (exited)",
              f"{ms(gone50)} / {ms(gone_max)}", "", "", "")
        t.row("crossing 85% -> victim's memory freed", f"{ms(fre50)} / {ms(fre_max)}", "", "", "")
        t.row("crossing 85% -> victim requeued (event)", f"{ms(req50)} / {ms(req_max)}", "", "",
              "")
        t.note(f"reaction: {len(runs)} real run(s) of `serve --memory-budget {budget}` (default "
               f"poll 0.25 s): a 'low' chunked job (checkpoint every 50 ms) runs, then a 'high' "
               f"hog of {hog_mb} MiB starts; crossing = first sample (every 5 ms, from this "
               f"process) of the tree's PSS at >= 85% of the budget; signalled = the 'decision' "
               f"event; freed = the victim's RSS gone (zombie or reaped); levels seen: "
               + "; ".join(" -> ".join(r["levels"]) + f" (peak {r['peak']:.0f}%)" for r in runs))

    # -- cost of polling ------------------------------------------------------------------
    # In a fresh, small process with two forked children, like a supervisor with two jobs:
    # the cost of reading a process's PSS grows with its mappings, and this bench process
    # has grown large by now.
    say("MemoryProbe.read cost, a small process with 2 forked children")
    out = subprocess.run([PY, "-c", PROBE_COST, ROOT, str(n["poll_calls"])], capture_output=True,
                         text=True, check=True)
    cost = json.loads(out.stdout)
    for label, key in (("without budget", "none"), ("with budget (PSS of the tree)", "budget")):
        cpu = cost[key]
        share = cpu / 0.1
        t.row(f"MemoryProbe.read {label}: CPU per call", f"{1e6 * cpu:.0f} us",
              f"psutil PSS {1e6 * cost['naive']:.0f} us", f"{cpu / cost['naive']:.2f}x", "")
        t.row("   as % of a core at a 100 ms poll", f"{100 * share:.2f}%", "", "", "< 1%",
              share < 0.01)
    t.note("probe cost: process CPU time per MemoryProbe.read(2 child pids) in a fresh python "
           "that imported litequeue and forked 2 sleeping children; psutil PSS = "
           "psutil.virtual_memory() + Process.memory_full_info() (smaps) for the same 3 "
           "processes, the obvious way to count the tree without double-counting")

    # -- a real idle supervisor polling every 100 ms with a budget ------------------------
    say(f"idle supervisor at --poll 0.1 --memory-budget 1G over {n['idle_poll_s']:g}s")
    db = bench.path("poll.db")
    queue = litequeue.Queue(db)
    with serving(["--db", db, "--poll", "0.1", "--memory-budget", "1G"], db + ".log") as proc:
        wait_until(lambda: queue.live_supervisors() or proc.poll() is not None, 30,
                   what="the supervisor to register")
        time.sleep(1.0)
        sup = psutil.Process(proc.pid)
        c0, w0 = sup.cpu_times(), time.monotonic()
        time.sleep(n["idle_poll_s"])
        c1, w1 = sup.cpu_times(), time.monotonic()
        share = (c1.user + c1.system - c0.user - c0.system) / (w1 - w0)
    queue.close()
    t.row("whole idle supervisor, --poll 0.1 with a budget (% of a core)", f"{100 * share:.2f}%",
          "", "", "(all its work, not only polling)", None)
    return t


# ======================================================================================
# 4. retention soak
# ======================================================================================

def section_retention(bench):
    n = bench.n
    total, purge_every, print_every = n["soak_jobs"], n["soak_purge_every"], n["soak_print_every"]
    keep = 1.0
    t = Table(f"4. retention soak: {total:,} jobs through one file, purge(older_than={keep:g}s) "
              f"+ checkpoint_wal() every {purge_every:,} jobs")
    db = bench.path("soak.db")
    queue = litequeue.Queue(db, durable=False)
    reader = litequeue.Queue(db)               # a status reader, like `litequeue status`
    owner = "soak"
    done = 0
    t0 = time.perf_counter()
    growth = None
    print_rows = []
    say(f"soak: {total:,} jobs")
    while done < total:
        batch = min(500, total - done)
        queue.enqueue_many([("echo", {"i": done + i}) for i in range(batch)])
        for _ in range(batch):
            job = queue.claim(owner)[0]
            queue.complete(job.id, owner, job.attempts, {"ok": True})
            done += 1
            if done % 1000 == 0:
                reader.stats()
            if done == purge_every and growth is None:     # before the first purge
                growth = (file_size(db) + file_size(db + "-wal")) / done
            if done % purge_every == 0:
                queue.purge(keep)
                queue.checkpoint_wal()
            if done % print_every == 0:
                rows = reader._read("SELECT (SELECT count(*) FROM jobs) AS jobs,"
                                    " (SELECT count(*) FROM events) AS events")[0]
                print_rows.append((done, time.perf_counter() - t0, rows["jobs"], rows["events"],
                                   file_size(db), file_size(db + "-wal"),
                                   file_size(db + "-shm")))
                say(f"{done:,} jobs, db {mb(file_size(db))}, wal {mb(file_size(db + '-wal'))}")
    elapsed = time.perf_counter() - t0
    reader.close()
    queue.close()
    for done_, at, jobs, events, size, wal, shm in print_rows:
        t.row(f"after {done_:>7,} jobs ({at:5.1f}s): {jobs:>5} jobs, {events:>6} events rows",
              f"db {mb(size)} + wal {mb(wal)}", f"shm {mb(shm)}")
    _, _, _, _, size, wal, _ = print_rows[-1]
    end = size + wal
    extrapolated = growth * total if growth else 0
    t.row("db + wal at the end", mb(end), f"no purge ~{mb(extrapolated)}",
          pct(end / extrapolated) if extrapolated else "", "< 10 MiB", end < 10 * MiB)
    t.row("throughput of the soak (enqueue_many + claim + complete)", rate(total / elapsed), "",
          "", "")
    t.note("in-process (a serve --keep run at fork-per-job speed would take many minutes): "
           "Queue(durable=False) enqueue_many of 500, then claim+complete each; a second "
           "connection reads stats() every 1,000 jobs; 'no purge' extrapolates the file's "
           f"growth over the first {purge_every:,} jobs")
    return t


# ======================================================================================
# main
# ======================================================================================

RUNNERS = {"enqueue": section_enqueue, "supervisor": section_supervisor,
           "memory": section_memory, "retention": section_retention}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test)")
    parser.add_argument("--only", help="one section (or a comma-separated list): "
                        + ", ".join(SECTIONS))
    parser.add_argument("--dir", help="where to put the database files (default: $TMPDIR)")
    parser.add_argument("--keep-files", action="store_true", help="do not delete the files")
    parser.add_argument("--json", help="also write the tables to this JSON file")
    args = parser.parse_args(argv)
    chosen = SECTIONS
    if args.only:
        chosen = tuple(s.strip() for s in args.only.split(",") if s.strip())
        unknown = [s for s in chosen if s not in SECTIONS]
        if unknown:
            parser.error(f"unknown section {', '.join(unknown)}: choose from {', '.join(SECTIONS)}")

    bench = Bench(args)
    print(machine_header(bench), flush=True)
    started = time.perf_counter()
    failed_sections = []
    try:
        for name in chosen:
            t0, load0 = time.perf_counter(), os.getloadavg()[0]
            try:
                table = RUNNERS[name](bench)
            except Exception:
                failed_sections.append(name)
                print(f"\n== {name}: the benchmark itself failed ==\n{traceback.format_exc()}",
                      flush=True)
                continue
            load1 = os.getloadavg()[0]
            busy = " (the machine was busy elsewhere: rates are disturbed, ratios less so)" if (
                max(load0, load1) > 1.5 * (os.cpu_count() or 1)) else ""
            table.note(f"section took {time.perf_counter() - t0:.0f}s; 1-min load average "
                       f"{load0:.2f} at its start, {load1:.2f} at its end{busy}")
            bench.tables.append(table)
            print("\n" + table.render(), flush=True)
    finally:
        bench.cleanup()
    verdicts = [r[5] for table in bench.tables for r in table.rows if r[5]]
    print(f"\n{verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL"
          + (f", sections that could not run: {', '.join(failed_sections)}" if failed_sections
             else "") + f"; total {time.perf_counter() - started:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([table.as_dict() for table in bench.tables], f, indent=2)
    return 1 if failed_sections else 0


if __name__ == "__main__":
    sys.exit(main())
