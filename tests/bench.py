#!/usr/bin/env python3
"""litequeue benchmarks: our figures beside a comparison measured on the same machine, in
the same run, with the ratio and the target of each (issues 2-5).

This is a script, not a test: pytest does not collect it (no test_ file name, no test_
functions). Run it from anywhere:

    python tests/bench.py                   # everything (a few minutes on 2 cores)
    python tests/bench.py --quick           # smaller runs: a smoke test, under a minute
    python tests/bench.py --only enqueue    # one section: enqueue, supervisor, memory, retention,
                                            # peers, output
    python tests/bench.py --dir /mnt/sd     # put the database files on the device under test

Sections:
  enqueue     single enqueues (FULL and NORMAL) and enqueue_many beside raw apsw doing the
              same minimal SQL on a file with the same schema and pragmas; claim+complete on
              100k and 1M queued jobs beside raw apsw; the same claims with priority aging
              (serve's default --age) beside none; the README's cron line (`python -m
              litequeue enqueue heartbeat` from the app's directory) and `litequeue.py enqueue
              heartbeat`, wall time beside `python -c pass` and `python -c "import apsw, click"`.
  supervisor  2,000 no-op jobs through `serve --burst --slots 2` beside bare fork+join two at a
              time; enqueue-to-start latency with an idle supervisor; idle RSS and CPU.
  memory      reaction time from pressure crossing the preempt threshold to the victim being
              signalled and gone, in a real run under --memory-budget; CPU cost of polling.
  psi         a real memory spike (with real stalls) in a small cgroup v1 memory group to the
              victim signalled, `serve --poll 2` with PSI wake-ups on and off in turn; the
              wake-up latency from a fired trigger fd to the memory read.
  retention   100,000 jobs through the queue with a short keep: file sizes stay bounded.
  peers       beside PyPI's litequeue (another project), persist-queue's SQLiteAckQueue, huey's
              SqliteHuey and rq (with redis-server, when one is installed), installed in a
              virtualenv of their own under ~/.cache/litequeue-bench (never in this
              environment; --fresh-peers rebuilds it): enqueue and dequeue+ack rates at the
              same synchronous setting, no-op jobs end to end through 2 workers, idle RSS.
  output      job output (issue 11), in a real job's child: print and ctx.emit of 1 KiB lines
              beside a plain write() loop to a file in the same child; the child's RSS while
              it emits 1 GiB; `jobs output ID --follow` latency from ctx.emit to the line read.
  metrics     Queue.metrics_text() on a file of 100k jobs (issue 12); `litequeue.py metrics
              --textfile` wall time beside `python -c "import apsw, click"`; a supervisor's
              cost of recording its pressure samples beside its lease renewal.

Nothing here changes litequeue: every figure goes through its public API or its CLI.
"""

import argparse
import contextlib
import json
import os
import platform
import random
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
    reaction_runs=5, poll_calls=2000, idle_poll_s=10.0, psi_runs=4, psi_wakes=200,
    soak_jobs=100_000, soak_purge_every=5000, soak_print_every=10_000,
    peer_rounds=6, peer_count=500, peer_e2e_fork=2000, peer_e2e_pool=10_000, peer_per_child=1000,
    peer_idle_jobs=20, peer_settle_s=3.0, peer_window_s=2.0,
    output_bytes=64 * MiB, output_rounds=3, output_big_bytes=1 << 30, follow_lines=20,
    metrics_jobs=100_000, metrics_calls=50, sample_writes=500,
    dash_jobs=100_000, dash_requests=100, dash_idle_s=10.0,
    cgroup_ops=500, isolation_rounds=3,
)
QUICK_RUN = dict(
    single_full=30, single_normal=150, single_rounds=7,
    many_batches=1, many_rounds=3,
    claim_sizes=(10_000, 100_000), claim_full=30, claim_normal=100, claim_rounds=5,
    cli_runs=3,
    sup_jobs=150, latency_jobs=15, idle_s=4.0, fork_latency_n=20,
    reaction_runs=1, poll_calls=300, idle_poll_s=3.0, psi_runs=2, psi_wakes=30,
    soak_jobs=10_000, soak_purge_every=1000, soak_print_every=2000,
    peer_rounds=3, peer_count=100, peer_e2e_fork=150, peer_e2e_pool=300, peer_per_child=1000,
    peer_idle_jobs=6, peer_settle_s=1.0, peer_window_s=0.5,
    output_bytes=4 * MiB, output_rounds=3, output_big_bytes=64 * MiB, follow_lines=10,
    metrics_jobs=100_000, metrics_calls=10, sample_writes=100,
    dash_jobs=20_000, dash_requests=20, dash_idle_s=2.0,
    cgroup_ops=100, isolation_rounds=1,
)
SECTIONS = ("enqueue", "supervisor", "memory", "isolation", "psi", "retention", "peers",
            "output", "metrics", "dashboard")


# ======================================================================================
# Output: one table per section
# ======================================================================================

class Table:
    """Rows of (metric, ours, comparison, ratio, target, verdict), printed aligned."""

    HEAD = ("metric", "litequeue", "comparison", "ratio", "target", "")

    def __init__(self, title, notes=()):
        self.title, self.notes, self.rows = title, list(notes), []
        self.data = None             # raw figures for --json, where a section keeps them

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
        out = {"title": self.title, "notes": self.notes,
               "rows": [dict(zip(("metric", "litequeue", "comparison", "ratio", "target",
                                  "verdict"), r)) for r in self.rows]}
        if self.data is not None:
            out["data"] = self.data
        return out


def pct(x):
    return f"{100 * x:.0f}%"


def rate(x, unit="/s"):
    return f"{x:,.0f}{unit}" if x >= 100 else f"{x:,.1f}{unit}"


def ms(seconds):
    return f"{1000 * seconds:.1f} ms"


def us(seconds):
    return f"{1e6 * seconds:.0f} us"


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
        self.fresh_peers = args.fresh_peers
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


def prefill_mixed(path, n):
    """A litequeue file holding n due 'echo' jobs, a third each high, normal and low, their
    due times spread over the last hour, so that with aging on (serve's default 10m) most
    normal and low jobs are claimed as high, merged with the high ones by due time."""
    litequeue.Queue(path).close()
    conn = apsw.Connection(path)
    conn.execute("PRAGMA synchronous = OFF")
    at = time.time()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO jobs (task, payload, priority, state, max_attempts, shed, created_at,"
        " due_at) VALUES ('echo', ?, ?, 'queued', 3, 0, ?, ?)",
        (('{"i": %d}' % i, 1 + i % 3, at, at - 3600 + 3600 * i / n) for i in range(n)))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    conn.execute("ANALYZE")
    conn.close()


def lq_consume(queue, n):
    """n jobs the way a consumer goes on: claim one, then complete_and_claim (one commit per
    job, what a pooled child does); returns jobs/s."""
    owner = "bench"
    t0 = time.perf_counter()
    job = queue.claim(owner)[0]
    for _ in range(n - 1):
        job = queue.complete_and_claim(job.id, owner, job.attempts)
    queue.complete(job.id, owner, job.attempts)
    return n / (time.perf_counter() - t0)


def lq_claim_complete(queue, n, age_s=None):
    """n claim+complete pairs through the public API; returns (pairs/s, claims/s)."""
    owner = "bench"
    claim_s = 0.0
    t0 = time.perf_counter()
    for _ in range(n):
        c0 = time.perf_counter()
        job = queue.claim(owner, age_s=age_s)[0]
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
    """Median wall times of the CLI start-up. "cron" is the line README.md documents, as cron
    runs it: from the app's directory (here this checkout), `python -m litequeue`."""
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    commands = {
        "pass": ([PY, "-c", "pass"], cwd),
        "import": ([PY, "-c", "import apsw, click"], cwd),
        "enqueue": ([PY, SCRIPT, "enqueue", "heartbeat", "--db", db], cwd),
        "cron": ([PY, "-m", "litequeue", "enqueue", "heartbeat", "--db", db], ROOT),
    }
    times = {name: [] for name in commands}
    for command, where in commands.values():        # warm the page cache and any pyc cache
        subprocess.run(command, cwd=where, env=env, capture_output=True, check=True)
    for _ in range(runs):
        for name, (command, where) in commands.items():
            t0 = time.perf_counter()
            done = subprocess.run(command, cwd=where, env=env, capture_output=True)
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

    # -- priority aging: the same claims with serve's default --age beside none ------------
    # On the big file (all normal, the older part of it due over 10 minutes ago: claimed as
    # high, one source) and on a file of high, normal and low jobs due over the last hour
    # (claimed as high by a merge of three sources), alternating sides each round.
    paths["mixed"] = bench.path(f"claim-mixed-{small}.db")
    say(f"prefill {small:,} high/normal/low jobs")
    prefill_mixed(paths["mixed"], small)
    age_s = litequeue.DEFAULT_AGE_S
    for key, what, target in (
            (big, f"{big:,} normal due over {big * 1e-3:.0f} s before the prefill", 0.9),
            ("mixed", f"{small:,} high/normal/low due over the last hour", None)):
        say(f"claim+complete with aging on and off, {what}")
        queue = litequeue.Queue(paths[key], durable=False)
        lq_claim_complete(queue, 100, age_s), lq_claim_complete(queue, 100, 0)   # warm up
        count = n["claim_normal"]
        results = {True: [], False: []}
        for r in range(n["claim_rounds"]):
            for aging in ((True, False) if r % 2 == 0 else (False, True)):
                results[aging].append(lq_claim_complete(queue, count, age_s if aging else 0))
        queue.close()
        on, off = results[True], results[False]
        ratio = statistics.median(a[0] / b[0] for a, b in zip(on, off))
        t.row(f"claim+complete, aging on (age_s={age_s:g}) vs off, {what}, NORMAL (pairs/s)",
              rate(statistics.median(a[0] for a in on)),
              f"off {rate(statistics.median(b[0] for b in off))}", pct(ratio),
              "(no target)" if target is None else f">= {target:.0%} of off",
              None if target is None else ratio >= target)
    t.note("aging: Queue.claim(owner, age_s=600) (what `serve` passes by default) beside "
           "age_s=0 on the same file, rounds alternating which goes first; on the mixed "
           "file each claim with aging reads the next job of three priorities (one index "
           "seek each) and takes the earliest, where without it reads one")
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
        ratio = med["cron"] / med["import"]
        # The target is for what cron on a device gets: Python's .pyc cache on. With
        # PYTHONDONTWRITEBYTECODE every module is compiled on every run, whatever we do.
        judged = what == variants[-1][0]
        t.row(f"README's cron line (`cd APP && python -m litequeue enqueue heartbeat`), {what}",
              ms(med["cron"]), f"import apsw, click {ms(med['import'])}", f"{ratio:.2f}x",
              "< 1.5x" if judged else "(no target: nothing cached)",
              ratio < 1.5 if judged else None)
        t.row(f"   beside `python -c pass`, {what}", "", f"pass {ms(med['pass'])}",
              f"{med['cron'] / med['pass']:.2f}x")
        t.row(f"   `python litequeue.py enqueue heartbeat`, {what}", ms(med["enqueue"]),
              f"import apsw, click {ms(med['import'])}", f"{med['enqueue'] / med['import']:.2f}x")
    with open(SCRIPT) as f:
        source = f.read()
    compile_s = min(timed(lambda: compile(source, SCRIPT, "exec")) for _ in range(5))
    t.note(f"compiling litequeue.py ({len(source) // 1024} KiB) takes {ms(compile_s)} here: "
           f"`python litequeue.py` pays it on every run (a script is never read from a .pyc); "
           f"`python -m litequeue` (the README's cron line) and the installed `litequeue` "
           f"command do not")
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


def burst_profile(bench, n_jobs, durability, jobs_per_child):
    """Where a serve --burst run's time goes: (jobs/s, supervisor CPU s/job, children CPU
    s/job). The supervisor's own CPU and its reaped children's are read from /proc while it
    runs (the last sample, at most 20 ms before it exits)."""
    db = bench.path(f"profile-{durability}-{jobs_per_child}.db")
    remove_db(db)
    queue = litequeue.Queue(db)
    for start in range(0, n_jobs, 1000):
        queue.enqueue_many([("echo", {"i": i}) for i in range(start, min(n_jobs, start + 1000))])
    queue.close()
    args = [PY, SCRIPT, "serve", "--burst", "--slots", "2", "--db", db, "--durability",
            durability, "--jobs-per-child", str(jobs_per_child)]
    with open(db + ".log", "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, cwd=bench.dir)
        sup, last = psutil.Process(proc.pid), None
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                last = sup.cpu_times()
            time.sleep(0.02)
        wall = time.perf_counter() - t0
    if proc.returncode != 0 or last is None:
        raise RuntimeError(f"serve --burst exited {proc.returncode}: {log_tail(db + '.log')}")
    return (n_jobs / wall, (last.user + last.system) / n_jobs,
            (last.children_user + last.children_system) / n_jobs)


def fsyncs_per_job(bench, n_jobs, jobs_per_child):
    """fsync + fdatasync calls per job of a FULL serve --burst and its children, counted by
    strace (slow: only counted, never timed); None where strace is missing."""
    import shutil
    if shutil.which("strace") is None:
        return None
    db = bench.path(f"fsync-{jobs_per_child}.db")
    remove_db(db)
    queue = litequeue.Queue(db)
    queue.enqueue_many([("echo", {"i": i}) for i in range(n_jobs)])
    queue.close()
    trace = db + ".strace"
    subprocess.run(["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", trace, PY,
                    SCRIPT, "serve", "--burst", "--slots", "2", "--db", db, "--jobs-per-child",
                    str(jobs_per_child), "--log-level", "warning"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=bench.dir,
                   timeout=600, check=True)
    calls = 0
    with open(trace) as f:
        for line in f:
            fields = line.split()
            if fields and fields[-1] in ("fsync", "fdatasync"):
                calls += int(fields[3])
    return calls / n_jobs


def start_latencies(queue, n_jobs):
    """([enqueue -> claimed], [enqueue -> task running]) in seconds, for n_jobs `stamp` jobs
    enqueued one at a time to a live supervisor, each after the last finished."""
    to_claim, to_run = [], []
    for i in range(n_jobs):
        job_id = queue.enqueue("stamp")
        returned = time.time()
        job = wait_until(lambda: (lambda j: j if j.state in litequeue.FINAL_STATES else None)(
            queue.get(job_id)), 30, what=f"job {job_id}")
        if job.state != "done":
            raise RuntimeError(f"stamp job {job_id} ended {job.state}: {job.error}")
        to_claim.append(job.started_at - returned)
        to_run.append(job.result["t"] - returned)
        time.sleep(0.05 + 0.1 * ((i * 7919) % 100) / 100)   # gaps of 50-150 ms
    return to_claim, to_run


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
    # -- where the time goes: CPU by process, fsyncs per job ----------------------------
    for jobs_per_child, n_jobs in ((1, jobs), (1000, 10 * jobs)):
        say(f"{n_jobs} echo jobs, --jobs-per-child {jobs_per_child}, FULL: CPU by process")
        rate_, sup_cpu, children_cpu_ = burst_profile(bench, n_jobs, "full", jobs_per_child)
        t.row(f"--jobs-per-child {jobs_per_child}, FULL: jobs/s; CPU per job supervisor / "
              f"children", f"{rate(rate_)}; {ms(sup_cpu)} / {ms(children_cpu_)}", "", "", "")
        fsyncs = fsyncs_per_job(bench, min(n_jobs, 1000), jobs_per_child)
        t.row("   fsync+fdatasync calls per job (strace -c)",
              "n/a (no strace)" if fsyncs is None else f"{fsyncs:.2f}", "", "", "")
    t.note("CPU by process: the supervisor's own user+sys and its reaped children's, read "
           "from /proc every 20 ms while it runs; fsyncs: strace -f -c over a separate run of "
           "at most 1,000 jobs (counted, not timed)")
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
        to_claim, to_run = start_latencies(queue, n["latency_jobs"])
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
# 3b. isolation: the cost of a cgroup per job, and what it holds
# ======================================================================================

SHM_HOG_APP = """
import mmap, os, sys, time
sys.path.insert(0, {root!r})
from litequeue import Queue
queue = Queue({db!r})

@queue.task(max_attempts=1)
def shm_hog(ctx, mb=600):
    area = mmap.mmap(-1, mb << 20, flags=mmap.MAP_SHARED)
    for offset in range(0, mb << 20, mmap.PAGESIZE):
        area[offset] = 1
    time.sleep(30)
"""


class BenchGroup:
    """A v1/v2 memory cgroup below this process's own, for one serve run: its peak usage
    is what the supervisor and all its jobs held at most."""

    def __init__(self, groups, name):
        self.groups, self.path = groups, os.path.join(groups.own_dir, name)
        os.mkdir(self.path)

    def join(self):                       # preexec_fn: serve starts inside it
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def usage(self):
        return litequeue.group_usage_bytes(self.groups.version, self.path)

    def peak(self):
        name = "memory.max_usage_in_bytes" if self.groups.version == 1 else "memory.peak"
        with open(os.path.join(self.path, name)) as f:
            return int(f.read())

    def remove(self):
        self.groups._remove_tree(self.path, 5.0)


def isolation_burst(bench, n_jobs, isolation, jobs_per_child=1):
    """jobs/s of serve --burst --slots 2 with that --isolation (a fresh child per job, or
    pooled children)."""
    db = bench.path(f"iso-{isolation}-{jobs_per_child}.db")
    queue = litequeue.Queue(db)
    for start in range(0, n_jobs, 1000):
        queue.enqueue_many([("echo", {"i": i}) for i in range(start, min(n_jobs, start + 1000))])
    queue.close()
    t0 = time.perf_counter()
    with open(db + ".log", "w") as log:
        proc = subprocess.run([PY, SCRIPT, "serve", "--burst", "--slots", "2", "--db", db,
                               "--isolation", isolation, "--jobs-per-child",
                               str(jobs_per_child)], stdout=subprocess.DEVNULL, stderr=log,
                              cwd=bench.dir, timeout=1800)
    wall = time.perf_counter() - t0
    text = open(db + ".log").read()
    if proc.returncode != 0 or f"memory isolation: {isolation}" not in text:
        raise RuntimeError(f"serve --isolation {isolation} exited {proc.returncode}: "
                           f"{log_tail(db + '.log')}")
    return n_jobs / wall


def shm_hog_peak(bench, groups, isolation):
    """(peak of the supervisor's group above what it held serving, how the job ended) for a
    600 MiB MAP_SHARED hog under --memory-limit 200M."""
    db = bench.path(f"hog-{isolation}.db")
    app = os.path.join(bench.dir, f"hog_app_{isolation}.py")
    with open(app, "w") as f:
        f.write(SHM_HOG_APP.format(root=ROOT, db=db))
    group = BenchGroup(groups, f"bench-{os.getpid()}-{isolation}")
    try:
        queue = litequeue.Queue(db)
        with open(db + ".log", "w") as log:
            proc = subprocess.Popen([PY, SCRIPT, "serve", "--app", app, "--db", db,
                                     "--memory-limit", "200M", "--poll", "0.25", "--isolation",
                                     isolation], stdout=subprocess.DEVNULL, stderr=log,
                                    cwd=bench.dir, preexec_fn=group.join)
            try:
                wait_until(lambda: queue.live_supervisors() or proc.poll() is not None, 30,
                           what="the supervisor to register")
                time.sleep(0.5)
                serving_bytes = group.usage()
                job_id = queue.enqueue("shm_hog", {"mb": 600})
                job = wait_until(lambda: (lambda j: j if j.state in litequeue.FINAL_STATES
                                          else None)(queue.get(job_id)), 60, what="the hog")
            finally:
                stop_process(proc)
        queue.close()
        return group.peak() - serving_bytes, job.error.splitlines()[0]
    finally:
        group.remove()


def section_isolation(bench):
    n = bench.n
    t = Table("3b. memory isolation: a cgroup per job against rlimit alone")
    try:
        groups = litequeue.JobCgroups.detect()
    except litequeue.CgroupUnusable as exc:
        t.note(f"no cgroup per job on this machine ({exc}): section skipped")
        return t

    say("making and removing a job's group, in this process")
    made = []
    t0 = time.perf_counter()
    for _ in range(n["cgroup_ops"]):
        made.append(groups.create(200 * MiB))
    t1 = time.perf_counter()
    for path in made:
        groups.release(path)
    t2 = time.perf_counter()
    groups.close()
    t.row("make a job's group (mkdir + limits)", us((t1 - t0) / len(made)), "", "", "")
    t.row("remove it (rmdir, after the child is reaped)", us((t2 - t1) / len(made)), "", "",
          "")
    jobs = n["sup_jobs"]
    rates = {"rlimit": [], "cgroup": []}
    for round_ in range(n["isolation_rounds"]):
        for isolation in ("rlimit", "cgroup"):
            say(f"{jobs} echo jobs, serve --burst --isolation {isolation} "
                f"(round {round_ + 1}/{n['isolation_rounds']})")
            rates[isolation].append(isolation_burst(bench, jobs, isolation))
    plain, grouped = (statistics.median(rates[k]) for k in ("rlimit", "cgroup"))
    cost_s = 1 / grouped - 1 / plain
    t.row(f"{jobs:,} no-op jobs, serve --burst, a fresh child each (jobs/s)", rate(grouped),
          f"rlimit {rate(plain)}", pct(grouped / plain), "")
    t.row("   cost of the group per job (1/rate difference)", ms(cost_s), "", "", "< 1 ms",
          cost_s < 0.001)
    pooled_jobs = 10 * jobs
    pooled = {"rlimit": [], "cgroup": []}
    for round_ in range(n["isolation_rounds"]):
        for isolation in ("rlimit", "cgroup"):
            say(f"{pooled_jobs} echo jobs, --jobs-per-child 1000 --isolation {isolation}")
            pooled[isolation].append(isolation_burst(bench, pooled_jobs, isolation, 1000))
    plain, grouped = (statistics.median(pooled[k]) for k in ("rlimit", "cgroup"))
    t.row(f"{pooled_jobs:,} no-op jobs, --jobs-per-child 1000 (jobs/s)", rate(grouped),
          f"rlimit {rate(plain)}", pct(grouped / plain), "")
    t.row("   cost of the group per job (1/rate difference)", us(1 / grouped - 1 / plain),
          "", "", "")

    db = bench.path("iso-latency.db")
    app = os.path.join(bench.dir, "iso_stamp_app.py")
    with open(app, "w") as f:
        f.write(STAMP_APP.format(root=ROOT, db=db))
    latency = {}
    queue = litequeue.Queue(db)
    for isolation in ("rlimit", "cgroup"):
        with serving(["--app", app, "--db", db, "--isolation", isolation],
                     db + f".{isolation}.log") as proc:
            wait_until(lambda: queue.live_supervisors() or proc.poll() is not None, 30,
                       what="the supervisor to register")
            time.sleep(1.0)
            say(f"enqueue-to-start latency, --isolation {isolation}, {n['latency_jobs']} jobs")
            latency[isolation] = start_latencies(queue, n["latency_jobs"])[1]
    queue.close()
    p50 = {k: percentile(v, 50) for k, v in latency.items()}
    t.row("enqueue -> task running, p50", ms(p50["cgroup"]), f"rlimit {ms(p50['rlimit'])}",
          f"{1e3 * (p50['cgroup'] - p50['rlimit']):+.1f} ms", "< 1 ms more",
          p50["cgroup"] - p50["rlimit"] < 0.001)
    t.row("enqueue -> task running, p99", ms(percentile(latency["cgroup"], 99)),
          f"rlimit {ms(percentile(latency['rlimit'], 99))}", "", "")

    for isolation in ("rlimit", "cgroup"):
        say(f"600 MiB MAP_SHARED hog under --memory-limit 200M, --isolation {isolation}")
        above, error = shm_hog_peak(bench, groups, isolation)
        t.row(f"600 MiB MAP_SHARED hog, limit 200M, {isolation}: peak above serving",
              mb(above), "limit 200 MiB", "", "<= limit + 8 MiB" if isolation == "cgroup"
              else "", (above <= 208 * MiB) if isolation == "cgroup" else None)
        t.note(f"{isolation}: the hog ended: {error}")
    t.note(f"isolation: {groups!r}; throughput rounds alternate rlimit and cgroup "
           f"({n['isolation_rounds']} each, median); latency as in section 2; the hog runs in "
           f"a fresh serve placed in a memory cgroup of its own, whose peak usage "
           f"(max_usage_in_bytes / memory.peak) counts the supervisor and every job")
    return t


# ======================================================================================
# 3c. psi: a real memory spike, the victim signalled with and without PSI wake-ups
# ======================================================================================

PSI_APP = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from litequeue import Queue
    queue = Queue(os.environ["LITEQUEUE_DB"])

    @queue.task(priority="low")
    def steady(ctx, chunks=400, chunk_s=0.05):
        state = ctx.checkpoint or {{"i": 0}}
        while state["i"] < chunks:
            time.sleep(chunk_s)
            state = {{"i": state["i"] + 1}}
            ctx.save(state)

    @queue.task(priority="high")
    def spike(ctx, mb, path, mark, seconds=10.0):
        # Anonymous memory up to ~88% of the group at once, then a file twice the group's
        # size read in a loop: its page cache is reclaimed and read again all the time,
        # the stalls a real job near its group's limit causes.
        block = bytearray(b"\\x01") * (mb << 20)
        with open(mark, "w") as f:
            f.write(repr(time.time()))
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)   # charged to this group when read
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            os.lseek(fd, 0, os.SEEK_SET)
            while os.read(fd, 1 << 20):
                pass
        return len(block)
""")


def own_memory_cgroup_v1():
    """This process's cgroup v1 memory directory, if we may make groups in it."""
    with contextlib.suppress(OSError):
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    directory = os.path.join("/sys/fs/cgroup/memory", path.lstrip("/"))
                    return directory if os.access(directory, os.W_OK) else None
    return None


@contextlib.contextmanager
def memory_group(parent, limit_bytes):
    group = os.path.join(parent, f"lqbench-psi-{os.getpid()}")
    os.mkdir(group)
    try:
        with open(os.path.join(group, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit_bytes))
        yield group
    finally:
        for _ in range(50):          # the last of its processes may still be exiting
            try:
                os.rmdir(group)
                break
            except OSError:
                time.sleep(0.1)


def group_used_bytes(group):
    """What the supervisor reads: usage less the inactive page cache (CgroupMemory, v1)."""
    with open(os.path.join(group, "memory.usage_in_bytes")) as f:
        usage = int(f.read())
    with open(os.path.join(group, "memory.stat")) as f:
        stat = dict(line.split() for line in f)
    return usage - int(stat["total_inactive_file"])


def psi_stall_us():
    with open("/proc/pressure/memory") as f:
        return int(f.readline().split("total=")[1])


def wait_psi_quiet(quiet_s, timeout_s=30.0):
    """Until the machine has not stalled on memory for quiet_s (so a trigger fire after
    the spike is the spike's, not left over from what ran before it)."""
    deadline = time.monotonic() + timeout_s
    last, since = psi_stall_us(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        stall = psi_stall_us()
        if stall != last:
            last, since = stall, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return True
    return False


def stall_lines_at(log_path):
    """When the supervisor logged that a PSI trigger fired (its debug line), epoch seconds."""
    times = []
    with open(log_path) as f:
        for line in f:
            if "memory stall (PSI)" in line:
                stamp, _, millis = line[:23].partition(",")
                times.append(time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))
                             + int(millis) / 1000)
    return times


def spike_run(bench, group, limit_bytes, poll_s, psi, big):
    """One real serve in `group`: a low steady job runs, a high job spikes at a random
    point of the poll interval; seconds from the spike (its memory resident) to the
    steady job's stop decision."""
    db = bench.path("psi.db")
    app = os.path.join(bench.dir, "psi_app.py")
    with open(app, "w") as f:
        f.write(PSI_APP.format(root=ROOT))
    mark = os.path.join(bench.dir, "spiked")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(mark)
    queue = litequeue.Queue(db)
    log_path = db + ".log"
    procs = os.path.join(group, "cgroup.procs")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [PY, SCRIPT, "serve", "--db", db, "--app", app, "--poll", str(poll_s), "--grace", "5",
         "--memory-limit", "2G", "--psi" if psi else "--no-psi", "--log-level", "debug"],
        stdout=subprocess.DEVNULL, stderr=log, cwd=bench.dir,
        env={**os.environ, "LITEQUEUE_DB": db},
        preexec_fn=lambda: open(procs, "w").write(str(os.getpid())))
    try:
        with warnings_off():
            low = queue.enqueue("steady", {})
        wait_until(lambda: chunked_running(queue, low), 30, what="the steady job to run")
        quiet = wait_psi_quiet(2.5)       # longer than the kernel's 2 s trigger period
        time.sleep(random.uniform(0, poll_s))
        mb = int((0.88 * limit_bytes - group_used_bytes(group)) / MiB)
        stall0 = psi_stall_us()
        with warnings_off():
            queue.enqueue("spike", {"mb": mb, "path": big, "mark": mark,
                                    "seconds": poll_s + 5}, priority="high")
        decision = wait_until(
            lambda: [e for e in queue.events(job_id=low) if e["kind"] == "decision"], 30,
            interval=0.01, what="the steady job's stop decision")[0]
        with open(mark) as f:
            spiked_at = float(f.read())
        woken = [at for at in stall_lines_at(log_path) if spiked_at <= at <= decision["at"]]
        return {"psi": psi, "latency_s": decision["at"] - spiked_at, "by_psi": bool(woken),
                "decision": decision["to_state"], "pressure": decision["pressure"],
                "stall_ms": (psi_stall_us() - stall0) / 1000, "spike_mb": mb, "quiet": quiet}
    finally:
        stop_process(proc)
        log.close()
        queue.close()


@contextlib.contextmanager
def warnings_off():
    """The bench's own queue does not import the app: its task names are unknown to it."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", litequeue.UnknownTaskWarning)
        yield


def wake_latency(samples):
    """In one process, serve's loop parts: a trigger fd fires (real POLLPRI: out-of-band
    data on a socket pair), the sleeper returns, the supervisor's next step reads memory.
    Seconds from the fire to that read, with a 30 s poll."""
    import ctypes
    import socket

    class Probe:
        def read(self, child_pids=()):
            self.read_tick = time.monotonic()
            return litequeue.MemoryReading(10.0, 10.0)

    class Trigger:
        def __init__(self, fd):
            self.fd, self.path = fd, "socketpair"

        def close(self):
            pass

    db = os.path.join(tempfile.mkdtemp(), "wake.db")
    queue = litequeue.Queue(db)
    probe = Probe()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sup = litequeue.Supervisor(queue, probe=probe, poll=30)
    sup.register()
    sleeper = litequeue._Sleeper(db, ctypes.CDLL(None, use_errno=True), 0.01, Trigger(a.fileno()))
    latencies = []
    try:
        for _ in range(samples):
            wake_tick = sup.step()
            fired = []
            timer = threading.Timer(0.005, lambda: (fired.append(time.monotonic()),
                                                   b.send(b"x", socket.MSG_OOB)))
            timer.start()
            if sleeper.sleep(wake_tick, sup.pool, watch_writes=True):
                sup.memory_stalled()
            sup.step()
            timer.join()
            a.recv(1, socket.MSG_OOB)          # (a socket's POLLPRI stays until read)
            latencies.append(probe.read_tick - fired[0])
    finally:
        sleeper.close()
        a.close()
        b.close()
        queue.unregister_supervisor(sup.id)
        queue.close()
    return latencies


def section_psi(bench):
    n = bench.n
    polls_s = (2.0, 10.0)
    t = Table("3c. PSI wake-ups: a real memory spike to the victim signalled, with and without "
              "PSI")
    trigger, said = litequeue.open_pressure_trigger(litequeue.CgroupMemory())
    if trigger is not None:
        trigger.close()
    t.note(f"here: {said}")
    parent = own_memory_cgroup_v1()
    if trigger is None or parent is None:
        t.note("spike runs skipped: " + ("no PSI trigger" if trigger is None else
                                         "no writable cgroup v1 memory group of our own"))
    else:
        limit = 384 * MiB
        big = os.path.join(bench.dir, "big.bin")
        with open(big, "wb") as f:
            for _ in range(2 * limit // MiB):
                f.write(os.urandom(MiB))
            os.fsync(f.fileno())
        runs = []
        for poll_s in polls_s:
            for i in range(n["psi_runs"]):
                for psi in ((True, False) if i % 2 == 0 else (False, True)):
                    say(f"spike run {i + 1}/{n['psi_runs']}, --poll {poll_s:g}, "
                        f"PSI {'on' if psi else 'off'}")
                    with memory_group(parent, limit) as group:     # no page cache left over
                        run = spike_run(bench, group, limit, poll_s, psi, big)
                    runs.append({**run, "poll_s": poll_s})
        for poll_s in polls_s:
            for psi in (True, False):
                values = [r["latency_s"] for r in runs if r["psi"] is psi
                          and r["poll_s"] == poll_s]
                t.row(f"--poll {poll_s:g}: spike -> victim signalled, PSI "
                      f"{'on ' if psi else 'off'} (p50 / max)",
                      f"{ms(statistics.median(values))} / {ms(max(values))}",
                      f"poll {ms(poll_s)}", "", "")
            on, off = (statistics.median(r["latency_s"] for r in runs
                                         if r["psi"] is psi and r["poll_s"] == poll_s)
                       for psi in (True, False))
            t.row("   p50 with PSI / p50 without", pct(on / off), "", "", "")
        t.note(f"{len(runs)} real `serve` runs at --poll 2 and 10, PSI on and off in turn, each "
               f"in a fresh cgroup v1 memory group of {mb(limit)} below this process's (the "
               f"supervisor reads its limit as the machine's): a low job saving every 50 ms "
               f"runs; a high job then makes ~88% of the group resident at once and reads a "
               f"file of {mb(2 * limit)} in a loop (page cache reclaimed and read again: real "
               f"stalls), at a random point of the poll interval, once the machine has not "
               f"stalled for 2.5 s. spike = the job's own time once its memory is resident; "
               f"signalled = "
               f"the 'decision' event. Per run (poll, PSI, ms, decision, stall ms in the "
               f"machine's "
               f"/proc/pressure/memory during the run): " + "; ".join(
                   f"poll {r['poll_s']:g} {'on' if r['psi'] else 'off'} "
                   f"{1000 * r['latency_s']:.0f} {r['decision']} {r['stall_ms']:.0f}"
                   + (" (woken by PSI)" if r["by_psi"] else "")
                   + ("" if r["quiet"] else " (never quiet before)") for r in runs))
    lat = wake_latency(n["psi_wakes"])
    t.row("fired trigger fd -> memory read (p50 / max)",
          f"{us(statistics.median(lat))} / {us(max(lat))}", "poll 30 s", "", "")
    t.note(f"fired fd -> read: {len(lat)} fires of a socket pair's out-of-band byte (POLLPRI, as "
           f"a PSI trigger signals) into the supervisor's own sleeper and step, in this process")
    t.note("the kernel checks an unprivileged trigger (a 2 s window: without CAP_SYS_RESOURCE "
           "it refuses 1 s) only every 2 s, so a stall is reported 0-2 s after it starts; "
           "with CAP_SYS_RESOURCE the 1 s window is checked every 100 ms")
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
# 5. peers: litequeue beside the queues people would otherwise pick
# ======================================================================================

# The peers are installed in a virtualenv of their own under the user's cache (never as
# dependencies of this project, never in this environment), reused while it holds these
# versions; --fresh-peers rebuilds it. Bump a pin here to measure a newer release.
PEER_PINS = (("litequeue", "0.9"), ("persist-queue", "1.1.0"), ("huey", "3.5.4"),
             ("rq", "3.0.0"))
PEER_DISTS = tuple(d for d, _ in PEER_PINS) + ("redis",)        # redis: rq's client
SYNC_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}

PEER_VERSIONS = ("import json, sqlite3, sys\n"
                 "from importlib.metadata import version\n"
                 "print(json.dumps({'python': sys.version.split()[0], 'sqlite3': "
                 "sqlite3.sqlite_version, **{d: version(d) for d in %r}}))")

# Runs in the peers' virtualenv: one peer queue, driven over stdin/stdout, one JSON command
# a line in and one JSON answer a line out, so that rounds can alternate with litequeue's
# in this process. Each put and each take is the peer's own public call, one at a time.
PEER_DRIVER = textwrap.dedent('''
    import json, os, sys, time, traceback

    kind, where, workdir = sys.argv[1:4]
    sys.path.insert(0, workdir)


    def pragmas(conn):
        import sqlite3
        return {"journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
                "synchronous": conn.execute("PRAGMA synchronous").fetchone()[0],
                "sqlite": sqlite3.sqlite_version}


    flush = []


    def open_peer():
        if kind == "litequeue":        # the PyPI package of that name: another project
            import litequeue
            q = litequeue.LiteQueue(where)

            def put(i):
                q.put(json.dumps({"i": i}))

            def take():
                message = q.pop()
                q.done(message.message_id)
            return put, take, lambda: {"qsize": q.qsize()}, pragmas(q.conn)
        if kind == "persist-queue":
            from persistqueue import SQLiteAckQueue
            q = SQLiteAckQueue(where)

            def put(i):
                q.put({"i": i})

            def take():
                q.ack(q.get(block=False, raw=True))
            return put, take, lambda: {"ready": q.ready_count()}, pragmas(q._putter)
        if kind == "huey":
            os.environ["PEER_HUEY_DB"] = where
            import huey_tasks
            huey = huey_tasks.huey

            def put(i):
                huey_tasks.noop(i)

            def take():
                if huey.dequeue() is None:
                    raise RuntimeError("huey: nothing to dequeue")
            return (put, take, lambda: {"pending": huey.pending_count()},
                    pragmas(huey.storage.conn))
        if kind == "rq":
            import redis, rq
            import rq_tasks
            conn = redis.Redis.from_url(where)
            q = rq.Queue(connection=conn)

            def put(i):
                q.enqueue(rq_tasks.noop, i)

            def state():
                return {"queued": len(q), "finished": q.finished_job_registry.count,
                        "failed": q.failed_job_registry.count}
            flush.append(conn.flushdb)
            return put, None, state, {"redis": conn.info("server")["redis_version"]}
        raise SystemExit("unknown peer " + kind)


    def answer(value):
        sys.stdout.write(json.dumps(value) + "\\n")
        sys.stdout.flush()


    try:
        put, take, state, info = open_peer()
        answer(info)
    except BaseException:
        answer({"error": traceback.format_exc()})
        raise SystemExit(1)
    for line in sys.stdin:
        try:
            cmd = json.loads(line)
            if cmd["op"] in ("state", "flush"):
                answer(state() if cmd["op"] == "state" else {"flushed": flush[0]()})
                continue
            fn = put if cmd["op"] == "put" else take
            start, n = cmd.get("start", 0), cmd["n"]
            t0 = time.perf_counter()
            if fn is put:
                for i in range(start, start + n):
                    put(i)
            else:
                for _ in range(n):
                    take()
            answer({"rate": n / (time.perf_counter() - t0)})
        except Exception:
            answer({"error": traceback.format_exc()})
''')

HUEY_TASKS = textwrap.dedent('''
    import os
    from huey import SqliteHuey

    huey = SqliteHuey(filename=os.environ["PEER_HUEY_DB"])   # its defaults: WAL, no pragma


    @huey.task()
    def noop(i):
        return None
''')

RQ_TASKS = textwrap.dedent('''
    def noop(i):
        return None
''')

LQ_NOOP_APP = """
import sys
sys.path.insert(0, {root!r})
from litequeue import Queue

queue = Queue({db!r})


@queue.task(max_attempts=1)
def noop(ctx, i=None):
    return None
"""


def peer_env(**extra):
    """A peer's environment: nothing of ours on its path (the PyPI `litequeue` it imports is
    another project of the same name)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    return {**env, **extra}


def peers_venv_dir():
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "litequeue-bench", "peers-venv")


def peer_versions(venv):
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        return None
    with contextlib.suppress(Exception):
        out = subprocess.run([python, "-c", PEER_VERSIONS % (PEER_DISTS,)], capture_output=True,
                             text=True, env=peer_env(), timeout=60, cwd=tempfile.gettempdir())
        if out.returncode == 0:
            return json.loads(out.stdout)
    return None


def ensure_peers_venv(fresh):
    """(venv dir, {dist: version}, built now?): reused while it holds the pinned versions."""
    venv = peers_venv_dir()
    versions = None if fresh else peer_versions(venv)
    if versions and all(versions.get(d) == pin for d, pin in PEER_PINS):
        say(f"peers' virtualenv reused: {venv}")
        return venv, versions, False
    pins = [f"{d}=={pin}" for d, pin in PEER_PINS]
    say(f"building the peers' virtualenv {venv}: pip install {' '.join(pins)}")
    shutil.rmtree(venv, ignore_errors=True)
    os.makedirs(os.path.dirname(venv), exist_ok=True)
    subprocess.run([PY, "-m", "venv", venv], check=True, capture_output=True, env=peer_env())
    done = subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--quiet",
                           "--disable-pip-version-check", *pins], capture_output=True, text=True,
                          env=peer_env(), timeout=900)
    versions = peer_versions(venv)
    if done.returncode != 0 or not versions:
        raise RuntimeError(f"could not install the peers in {venv}:\n{done.stderr[-2000:]}")
    return venv, versions, True


class PeerDriver:
    """A PEER_DRIVER process in the peers' virtualenv, holding one peer queue open."""

    def __init__(self, venv, workdir, kind, where):
        self.kind = kind
        self.log_path = os.path.join(workdir, f"driver-{kind}.log")
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [os.path.join(venv, "bin", "python"), os.path.join(workdir, "peer_driver.py"), kind,
             where, workdir], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            text=True, cwd=workdir, env=peer_env())
        self.info = self._answer()

    def _answer(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise RuntimeError(f"the {self.kind} driver exited {self.proc.returncode}: "
                               f"{log_tail(self.log_path)}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.kind}: {answer['error']}")
        return answer

    def call(self, op, **args):
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def put(self, n, start=0):
        return self.call("put", n=n, start=start)["rate"]

    def take(self, n):
        return self.call("take", n=n)["rate"]

    def close(self):
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.log.close()


@contextlib.contextmanager
def redis_server(workdir):
    """Our own redis-server on a unix socket, persistence off (no RDB, no AOF)."""
    sock_dir = workdir if len(workdir) < 80 else tempfile.mkdtemp(prefix="lqredis-")
    sock = os.path.join(sock_dir, "redis.sock")
    log = open(os.path.join(workdir, "redis.log"), "w")
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", "0", "--unixsocket", sock,
                             "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                             "--dir", workdir], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: os.path.exists(sock) or proc.poll() is not None, 15,
                   what="redis-server's socket")
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited {proc.returncode}: "
                               f"{log_tail(os.path.join(workdir, 'redis.log'))}")
        yield proc, f"unix://{sock}"
    finally:
        stop_process(proc)
        log.close()
        if sock_dir != workdir:
            shutil.rmtree(sock_dir, ignore_errors=True)


class LogCounter:
    """Counts lines holding `needle` in a growing log file, reading only what is new."""

    def __init__(self, path, needle):
        self.path, self.needle, self.offset, self.count, self.rest = path, needle, 0, 0, b""

    def __call__(self):
        with contextlib.suppress(OSError):
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
            self.offset += len(data)
            data = self.rest + data
            cut = data.rfind(b"\n") + 1
            self.count += data[:cut].count(self.needle)
            self.rest = data[cut:]
        return self.count


def tree_memory(root_pids):
    """(RSS summed over the processes, PSS summed, number of processes) of the trees."""
    rss = pss = count = 0
    for root in root_pids:
        with contextlib.suppress(psutil.Error):
            top = psutil.Process(root)
            for proc in [top] + top.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    rss += proc.memory_info().rss
                    pss += litequeue.process_pss_bytes(proc.pid) or 0
                    count += 1
    return rss, pss, count


def settled_memory(root_pids, settle_s, window_s):
    """Largest tree RSS (and PSS) over a window, after settle_s with nothing to do."""
    time.sleep(settle_s)
    samples = []
    deadline = time.monotonic() + window_s
    while True:
        samples.append(tree_memory(root_pids))
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    return max(s[0] for s in samples), max(s[1] for s in samples), max(s[2] for s in samples)


def first_line_about(path, words=("not supported", "Error", "error")):
    with contextlib.suppress(OSError):
        with open(path) as f:
            lines = [line.strip() for line in f if line.strip()]
        for word in words:
            for line in lines:
                if word in line:
                    return line
        return lines[-1] if lines else ""
    return ""


class NotAvailable(Exception):
    """A litequeue option not built yet (serve exits 2): the row says n/a with the reason."""


def lq_serve_args(app, db, durability, jobs_per_child, burst):
    return (["--app", app, "--db", db, "--slots", "2", "--durability", durability,
             "--jobs-per-child", str(jobs_per_child)] + (["--burst"] if burst else []))


def lq_noop_db(bench, name, n_jobs):
    """A litequeue file holding n_jobs queued no-op jobs, and the app that registers noop."""
    db = bench.path(f"{name}.db")
    app = os.path.join(bench.dir, f"{name}_app.py")
    with open(app, "w") as f:
        f.write(LQ_NOOP_APP.format(root=ROOT, db=db))
    queue = litequeue.Queue(db, durable=False)
    for start in range(0, n_jobs, 1000):
        queue.enqueue_many([("noop", {"i": i}) for i in range(start, min(n_jobs, start + 1000))])
    queue.close()
    return db, app


def lq_done(db):
    queue = litequeue.Queue(db)
    try:
        return queue.stats()["jobs"]
    finally:
        queue.close()


def lq_e2e(bench, n_jobs, durability, jobs_per_child):
    """jobs/s from `serve --burst` starting to its exit, n_jobs no-op jobs queued before."""
    db, app = lq_noop_db(bench, f"e2e-{durability}-{jobs_per_child}", n_jobs)
    log_path = db + ".log"
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.run([PY, SCRIPT, "serve", *lq_serve_args(app, db, durability,
                                                                  jobs_per_child, True)],
                              stdout=subprocess.DEVNULL, stderr=log, cwd=bench.dir, timeout=1800)
        wall = time.perf_counter() - t0
    if proc.returncode == 2 and jobs_per_child != 1:
        raise NotAvailable(first_line_about(log_path))
    counts = lq_done(db)
    if proc.returncode != 0 or counts["done"] != n_jobs:
        raise RuntimeError(f"serve --burst exited {proc.returncode} with {counts}; log tail:\n"
                           f"{log_tail(log_path)}")
    return n_jobs / wall


def lq_idle(bench, n_jobs, durability, jobs_per_child, settle_s, window_s):
    """Tree memory of a `serve` that ran n_jobs no-op jobs and then settled, empty."""
    db, app = lq_noop_db(bench, f"idle-{jobs_per_child}", n_jobs)
    log_path = db + ".log"
    with serving(lq_serve_args(app, db, durability, jobs_per_child, False), log_path) as proc:
        wait_until(lambda: proc.poll() is not None or lq_done(db)["done"] == n_jobs, 120,
                   interval=0.05, what="serve to run the idle test's jobs")
        if proc.poll() is not None:
            if proc.returncode == 2 and jobs_per_child != 1:
                raise NotAvailable(first_line_about(log_path))
            raise RuntimeError(f"serve exited {proc.returncode}: {log_tail(log_path)}")
        return settled_memory([proc.pid], settle_s, window_s)


def huey_consumer(venv, workdir, db, log_path):
    log = open(log_path, "w")
    proc = subprocess.Popen([os.path.join(venv, "bin", "huey_consumer"), "huey_tasks.huey",
                             "-k", "process", "-w", "2"], stdout=log, stderr=subprocess.STDOUT,
                            cwd=workdir, env=peer_env(PEER_HUEY_DB=db))
    log.close()
    return proc


def huey_run(venv, workdir, db, n_jobs, idle=None):
    """huey's consumer (-k process -w 2, its other options at their defaults) over n_jobs
    queued no-op tasks: jobs/s from its start to its log's n_jobs-th 'executed in' line; with
    idle=(settle_s, window_s), its settled tree memory instead."""
    driver = PeerDriver(venv, workdir, "huey", db)
    driver.put(n_jobs)
    driver.close()
    log_path = db + ".log"
    executed = LogCounter(log_path, b" executed in ")
    t0 = time.perf_counter()
    proc = huey_consumer(venv, workdir, db, log_path)
    try:
        wait_until(lambda: executed() >= n_jobs or proc.poll() is not None, 1800, interval=0.01,
                   what="huey's consumer to run the tasks")
        wall = time.perf_counter() - t0
        if proc.poll() is not None:
            raise RuntimeError(f"huey_consumer exited {proc.returncode}: {log_tail(log_path)}")
        if idle:
            return settled_memory([proc.pid], *idle)
    finally:
        stop_process(proc)
    driver = PeerDriver(venv, workdir, "huey", db)
    pending = driver.call("state")["pending"]
    driver.close()
    if pending:
        raise RuntimeError(f"huey: {pending} tasks still pending after {n_jobs} executed")
    return n_jobs / wall


def rq_run(venv, workdir, url, n_jobs, idle=None):
    """Two `rq worker` processes (the default Worker: a fork per job) over n_jobs queued no-op
    jobs: with --burst, jobs/s from their start to both exiting; with idle=(settle_s,
    window_s), without --burst, their settled tree memory."""
    driver = PeerDriver(venv, workdir, "rq", url)
    driver.call("flush")                                   # an empty redis database
    driver.put(n_jobs)
    logs = [open(os.path.join(workdir, f"rq-worker-{i}.log"), "w") for i in range(2)]
    command = [os.path.join(venv, "bin", "rq"), "worker", "--url", url, "--path", workdir]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(command + ([] if idle else ["--burst"]), stdout=log,
                              stderr=subprocess.STDOUT, cwd=workdir, env=peer_env())
             for log in logs]
    for log in logs:
        log.close()
    try:
        if idle:
            wait_until(lambda: (driver.call("state")["finished"] >= n_jobs
                                or any(p.poll() is not None for p in procs)), 120,
                       interval=0.05, what="rq's workers to run the idle test's jobs")
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"rq worker exited: {log_tail(logs[0].name)}")
            return settled_memory([p.pid for p in procs], *idle)
        for proc in procs:
            proc.wait(1800)
        wall = time.perf_counter() - t0
    finally:
        for proc in procs:
            stop_process(proc)
        state = driver.call("state")
        driver.close()
    if state["finished"] != n_jobs or state["queued"] or state["failed"]:
        raise RuntimeError(f"rq: {state} after {n_jobs} jobs; {log_tail(logs[0].name)}")
    return n_jobs / wall


def x(ratio):
    return f"{ratio:.2f}x"


def figure(ours, theirs, ratio, **more):
    """One comparison for --json: litequeue's figure, the peer's, litequeue/peer."""
    def side(v):
        return dict(zip(("rss", "pss", "processes"), v)) if isinstance(v, tuple) else v
    return {"litequeue": side(ours), "peer": side(theirs), "ratio": ratio, **more}


def section_peers(bench):
    t = Table("5. peers: litequeue beside the queues people would otherwise pick")
    data = t.data = {"durability": {}, "figures": {}}
    venv, versions, built = ensure_peers_venv(bench.fresh_peers)
    redis_bin = shutil.which("redis-server")
    redis_version = None
    if redis_bin:
        with contextlib.suppress(Exception):
            out = subprocess.run([redis_bin, "--version"], capture_output=True, text=True,
                                 timeout=10).stdout
            redis_version = out.split("v=")[1].split()[0]
    peers_line = ", ".join(f"{d} {versions.get(d, '?')}" for d in PEER_DISTS)
    data["versions"] = {**versions, "redis-server": redis_version, "venv": venv}
    say(f"peers: {peers_line}; redis-server {redis_version or '(none)'}")
    t.note(f"peers (PyPI, pinned): {peers_line} (rq's client), in {venv} "
           f"({'built now' if built else 'reused'}; --fresh-peers rebuilds it), python "
           f"{versions['python']} with its sqlite3 module on SQLite {versions['sqlite3']}; "
           f"litequeue runs on apsw's SQLite {apsw.sqlite_lib_version()}; "
           + (f"redis-server {redis_version} ({redis_bin})" if redis_bin
              else "rq: skipped, no redis-server"))
    workdir = os.path.join(bench.dir, "peers")
    os.makedirs(workdir, exist_ok=True)
    for name, text in (("peer_driver.py", PEER_DRIVER), ("huey_tasks.py", HUEY_TASKS),
                       ("rq_tasks.py", RQ_TASKS)):
        with open(os.path.join(workdir, name), "w") as f:
            f.write(text)
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(redis_server(workdir)) if redis_bin else None
        peers_rates(bench, t, venv, workdir, redis)
        peers_end_to_end(bench, t, venv, workdir, redis)
    return t


def peers_rates(bench, t, venv, workdir, redis):
    """Enqueue, then dequeue+ack, one at a time: each SQLite peer on its own file beside a
    litequeue file at the peer's synchronous setting, read from the peer's own connection."""
    n, data = bench.n, t.data
    rounds, count = n["peer_rounds"], n["peer_count"]
    total = rounds * count
    peers = [
        ("litequeue", "PyPI litequeue", "put()", "pop() + done()",
         os.path.join(workdir, "pypi-litequeue.db")),
        ("persist-queue", "persist-queue SQLiteAckQueue", "put()", "get() + ack()",
         os.path.join(workdir, "persist-queue")),
        ("huey", "huey SqliteHuey", "task()", "dequeue(), no ack",
         os.path.join(workdir, "huey-rates.db")),
    ]
    if redis:
        peers.append(("rq", "rq", "Queue.enqueue()", None, redis[1]))
    take_rows = []
    for kind, label, put_call, take_call, where in peers:
        say(f"{label}: {total:,} enqueues" + (f", then {total:,} dequeue+ack" if take_call
                                               else "") + ", rounds alternating with litequeue")
        driver = PeerDriver(venv, workdir, kind, where)
        if kind == "rq":
            driver.call("flush")
            durable, setting = False, "NORMAL vs redis, no persistence"
        else:
            sync = driver.info["synchronous"]
            durable = sync >= 2
            ours_label = "FULL" if durable else "NORMAL"
            theirs_label = SYNC_NAMES.get(sync, str(sync))
            data["durability"][kind] = {**driver.info, "litequeue": ours_label}
            setting = (f"both {ours_label}" if theirs_label == ours_label
                       else f"ours {ours_label}, theirs {theirs_label}")
        queue = litequeue.Queue(bench.path(f"beside-{kind}.db"), durable=durable)
        try:
            lq_single(queue, 50, 0)
            driver.put(50)
            ours, theirs, ratio = paired(rounds, lambda r: lq_single(queue, count, r * count),
                                         lambda r: driver.put(count, r * count))
            data["figures"][f"enqueue/{kind}"] = figure(ours, theirs, ratio)
            if kind == "rq":
                t.row(f"enqueue, one at a time, {setting} (jobs/s)", rate(ours),
                      f"{label} {put_call} {rate(theirs)}", x(ratio), "(no target)")
                continue
            t.row(f"enqueue, one commit each, {setting} (jobs/s)", rate(ours),
                  f"{label} {put_call} {rate(theirs)}", x(ratio), ">= 1.00x (ahead)",
                  ratio >= 1.0)
            lq_claim_complete(queue, 50)
            driver.take(50)
            ours, theirs, ratio = paired(rounds, lambda r: lq_consume(queue, count),
                                         lambda r: driver.take(count))
            data["figures"][f"take/{kind}"] = figure(ours, theirs, ratio)
            take_rows.append((f"claim+complete, one process, {setting} (jobs/s)", rate(ours),
                              f"{label} {take_call} {rate(theirs)}", x(ratio),
                              ">= 1.00x (ahead)", ratio >= 1.0))
            queue.enqueue_many([("echo", {"i": i}) for i in range(total)])    # a second lot
            driver.put(total, total)
            ours, theirs, ratio = paired(rounds, lambda r: lq_claim_complete(queue, count)[0],
                                         lambda r: driver.take(count))
            data["figures"][f"take-two-calls/{kind}"] = figure(ours, theirs, ratio)
            take_rows.append(("   the same with claim() and complete(), two commits a job",
                              rate(ours), f"{label} {rate(theirs)}", x(ratio), "(no target)"))
        finally:
            queue.close()
            driver.close()
    for row in take_rows:
        t.row(*row)
    t.note(f"enqueue and dequeue+ack: {total:,} jobs each way ({rounds} rounds of {count}, "
           f"alternating which side goes first, after 50 to warm up), payload {{'i': i}}; "
           f"litequeue: Queue.enqueue('echo', payload), then a consumer's loop: "
           f"Queue.claim(owner) once, then Queue.complete_and_claim() per job (the completion "
           f"and the next claim in one commit, as a pooled child runs; the claim is not "
           f"fsynced, the completion is), and the same with claim() + complete() per job "
           f"beside it; in this process; each peer: its own calls, one at a time, in a "
           f"process of its own in the venv; rates are medians, ratio the median of the "
           f"per-round ratios (litequeue/peer: above 1 is litequeue ahead)")
    t.note("durability, read from each peer's source and checked on its open connection "
           "(PRAGMA synchronous / journal_mode): " + "; ".join(
               f"{kind}: {info['journal_mode']}, synchronous="
               f"{SYNC_NAMES.get(info['synchronous'], info['synchronous'])} -> litequeue "
               f"{info['litequeue']}" for kind, info in data["durability"].items())
           + ". PyPI litequeue sets synchronous=NORMAL itself, and commits each put and done "
           "alone (autocommit) and each pop in BEGIN IMMEDIATE; persist-queue and huey set no "
           "synchronous pragma, so they get SQLite's default FULL; each of their puts is its "
           "own commit (huey's in BEGIN EXCLUSIVE)")
    t.note("what differs: huey's dequeue deletes the task in one commit and keeps no record "
           "(at-most-once: a consumer that dies mid-task loses it), where litequeue commits "
           "the claim and the completion (at-least-once); persist-queue's get is a SELECT then "
           "a separate UPDATE commit, not one transaction, so two processes can get the same "
           "item, and it pickles the item")


def peers_end_to_end(bench, t, venv, workdir, redis):
    """No-op jobs through a consumer with 2 workers; then each consumer's idle memory."""
    n, data = bench.n, t.data
    jobs_fork, jobs_pool, per_child = n["peer_e2e_fork"], n["peer_e2e_pool"], n["peer_per_child"]
    settle = (n["peer_settle_s"], n["peer_window_s"])
    url = redis[1] if redis else None

    say(f"end to end: {jobs_fork:,} no-op jobs, serve --burst --slots 2 --jobs-per-child 1, "
        f"NORMAL")
    ours_fork_normal = lq_e2e(bench, jobs_fork, "normal", 1)
    metric = "end to end, fresh process per job, NORMAL vs redis, no persistence"
    if url:
        say(f"end to end: {jobs_fork:,} no-op jobs, 2 x rq worker --burst (fork per job)")
        rq_rate = rq_run(venv, workdir, url, jobs_fork)
        ratio = ours_fork_normal / rq_rate
        data["figures"]["e2e/rq"] = figure(ours_fork_normal, rq_rate, ratio)
        t.row(f"{metric} (jobs/s)", rate(ours_fork_normal),
              f"rq 2 x Worker (fork/job) {rate(rq_rate)}", x(ratio), ">= 8.00x", ratio >= 8.0)
    else:
        t.row(f"{metric} (jobs/s)", rate(ours_fork_normal),
              "rq: skipped, no redis-server", "", ">= 8.00x")

    say(f"end to end: {jobs_pool:,} no-op tasks, huey_consumer -k process -w 2")
    huey_rate = huey_run(venv, workdir, os.path.join(workdir, "huey-e2e.db"), jobs_pool)
    say(f"end to end: {jobs_pool:,} no-op jobs, serve --burst --slots 2 --jobs-per-child "
        f"{per_child}, FULL")
    metric = f"end to end, --jobs-per-child {per_child}, both FULL (jobs/s)"
    try:
        ours_pool = lq_e2e(bench, jobs_pool, "full", per_child)
        ratio = ours_pool / huey_rate
        data["figures"]["e2e/huey-pooled"] = figure(ours_pool, huey_rate, ratio)
        t.row(metric, rate(ours_pool), f"huey -k process -w 2 {rate(huey_rate)}", x(ratio),
              ">= 1.00x (aim 1.50x)", ratio >= 1.0)
    except NotAvailable as exc:
        data["figures"]["e2e/huey-pooled"] = figure(None, huey_rate, None)
        t.row(metric, f"n/a ({exc})", f"huey -k process -w 2 {rate(huey_rate)}", "",
              ">= 1.00x (aim 1.50x)")
    say(f"end to end: {jobs_fork:,} no-op jobs, serve --burst --slots 2 --jobs-per-child 1, "
        f"FULL")
    ours_fork_full = lq_e2e(bench, jobs_fork, "full", 1)
    ratio = ours_fork_full / huey_rate
    data["figures"]["e2e/huey-fork"] = figure(ours_fork_full, huey_rate, ratio)
    t.row("end to end, fresh process per job, both FULL (jobs/s)", rate(ours_fork_full),
          f"huey -k process -w 2 {rate(huey_rate)}", x(ratio), "(no target)")

    # -- idle consumers -------------------------------------------------------------------
    idle_jobs = n["peer_idle_jobs"]
    say(f"idle memory: each consumer runs {idle_jobs} no-op jobs, settles {settle[0]:g}s, "
        f"then its process tree is sampled for {settle[1]:g}s")
    ours_idle = lq_idle(bench, idle_jobs, "full", 1, *settle)
    huey_idle = huey_run(venv, workdir, os.path.join(workdir, "huey-idle.db"), idle_jobs,
                         idle=settle)
    ratio = ours_idle[0] / huey_idle[0]
    data["figures"]["idle/huey"] = figure(ours_idle, huey_idle, ratio)
    t.row(f"idle consumer RSS, tree sum ({ours_idle[2]} vs {huey_idle[2]} processes)",
          mb(ours_idle[0]), f"huey -k process -w 2 {mb(huey_idle[0])}", x(ratio),
          "(lower is better)")
    pooled = None
    try:
        pooled = lq_idle(bench, idle_jobs, "full", per_child, *settle)
        ratio = pooled[0] / huey_idle[0]
        data["figures"]["idle/huey-pooled"] = figure(pooled, huey_idle, ratio)
        t.row(f"   with --jobs-per-child {per_child} ({pooled[2]} vs {huey_idle[2]} processes)",
              mb(pooled[0]), f"huey {mb(huey_idle[0])}", x(ratio), "(lower is better)")
    except NotAvailable as exc:
        t.row(f"   with --jobs-per-child {per_child}", f"n/a ({exc})", f"huey {mb(huey_idle[0])}",
              "", "(lower is better)")
    pss = (f"PSS (pages shared after fork counted once): litequeue {mb(ours_idle[1])}"
           + (f" ({mb(pooled[1])} with --jobs-per-child {per_child})" if pooled else "")
           + f", huey {mb(huey_idle[1])}")
    if url:
        rq_idle = rq_run(venv, workdir, url, idle_jobs, idle=settle)
        redis_rss = psutil.Process(redis[0].pid).memory_info().rss
        ratio = ours_idle[0] / rq_idle[0]
        data["figures"]["idle/rq"] = figure(ours_idle, rq_idle, ratio, redis_rss=redis_rss)
        t.row(f"idle consumer RSS, tree sum ({ours_idle[2]} vs {rq_idle[2]} processes)",
              mb(ours_idle[0]), f"rq 2 x Worker {mb(rq_idle[0])} + redis-server {mb(redis_rss)}",
              x(ratio), "(lower is better)")
        pss += f", rq's workers {mb(rq_idle[1])}"

    t.note(f"end to end: N no-op jobs queued first (N = {jobs_fork:,} for a fresh process per "
           f"job, litequeue and rq; {jobs_pool:,} for huey and litequeue pooled), timed from "
           f"starting the consumer until all are done: litequeue `serve --burst --slots 2 "
           f"--app <noop>` to its exit; huey `huey_consumer huey_tasks.huey -k process -w 2` "
           f"(its defaults: periodic tasks and results on; a no-op returns None, so nothing is "
           f"stored) to its log's N-th 'executed in' line; rq two `rq worker --burst` (the "
           f"default Worker, a fork per job; results kept) to both exiting; all log at their "
           f"default level to a file; one run each, compared runs back to back")
    t.note("durability end to end: huey's consumer opens its file at SQLite's default FULL, so "
           "litequeue runs FULL beside it; rq's redis-server runs with persistence off (--save "
           "'' --appendonly no: nothing reaches the disk), so litequeue runs at its lightest, "
           "NORMAL (survives any process crash; the last commits may roll back on power loss), "
           "which still keeps more than redis does here")
    t.note(f"idle: each consumer (2 slots / 2 workers) runs {idle_jobs} no-op jobs, waits "
           f"{settle[0]:g}s with an empty queue, then the largest RSS summed over its process "
           f"tree in {settle[1]:g}s of samples; litequeue `serve --slots 2` at FULL; {pss}")


# ======================================================================================
# 6. job output
# ======================================================================================

OUTPUT_APP = """
import os, sys, time
sys.path.insert(0, {root!r})
from litequeue import Queue

queue = Queue({db!r})
LINE = "x" * 1023 + "\\n"                 # 1 KiB with its newline


def _timed(fn):
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


@queue.task(max_attempts=1)
def throughput(ctx, total, scratch, rounds):
    lines = total // len(LINE)
    body = LINE[:-1]                        # print adds the newline

    def plain():
        with open(scratch, "a") as f:       # Python's default: a buffered text file
            for _ in range(lines):
                f.write(LINE)

    def raw():
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        data = LINE.encode()
        for _ in range(lines):              # one write() per line, as ctx.emit must
            os.write(fd, data)
        os.close(fd)

    def printed():
        for _ in range(lines):
            print(body)
        sys.stdout.flush()

    def emitted():
        for _ in range(lines):
            ctx.emit(LINE)

    times = {{"plain": [], "raw": [], "print": [], "emit": []}}
    for _ in range(rounds):                 # interleaved, so drift hits all alike
        for name, fn in (("plain", plain), ("print", printed), ("raw", raw), ("emit", emitted)):
            times[name].append(_timed(fn))
    os.unlink(scratch)                      # appended to, as the job's output file is
    return times


def _rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024


@queue.task(max_attempts=1)
def big(ctx, total):
    chunk = b"y" * 1023 + b"\\n"
    before, peak = _rss(), 0
    started = time.perf_counter()
    for i in range(total // len(chunk)):
        ctx.emit(chunk)
        if i % 65536 == 0:
            peak = max(peak, _rss())
    return {{"before": before, "peak": max(peak, _rss()), "after": _rss(),
             "s": time.perf_counter() - started}}


@queue.task(max_attempts=1)
def ticker(ctx, n):
    for i in range(n):
        ctx.emit(f"tick {{i}} {{time.time()!r}}\\n")
        time.sleep(0.2)
    return n
"""


def section_output(bench):
    n = bench.n
    t = Table("6. job output: print and ctx.emit in a real child, memory at 1 GiB, --follow")
    db = bench.path("output.db")
    app = os.path.join(bench.dir, "output_app.py")
    with open(app, "w") as f:
        f.write(OUTPUT_APP.format(root=ROOT, db=db))
    queue = litequeue.Queue(db)
    total, big_total = n["output_bytes"], n["output_big_bytes"]
    through = queue.enqueue("throughput", {"total": total, "rounds": n["output_rounds"],
                                           "scratch": os.path.join(bench.dir, "plain.out")})
    big = queue.enqueue("big", {"total": big_total})
    say(f"print / ctx.emit / write() of {mb(total)} in 1 KiB lines, {n['output_rounds']} rounds; "
        f"then {mb(big_total)} through ctx.emit")
    served = subprocess.run([PY, SCRIPT, "serve", "--burst", "--slots", "1", "--app", app,
                             "--db", db, "--output-limit", str(2 * big_total + 4 * total)],
                            capture_output=True, text=True, cwd=bench.dir)
    if served.returncode != 0:
        raise RuntimeError(f"serve exited {served.returncode}: {served.stderr[-2000:]}")
    results = {}
    for job_id in (through, big):
        job = queue.get(job_id)
        if job.state != "done":
            raise RuntimeError(f"job {job_id} ended {job.state}: {job.error}")
        results[job_id] = job.result
        with contextlib.suppress(OSError):
            os.unlink(queue.output_path(job_id))             # a GiB of y's: not kept
    times = {name: statistics.median(v) for name, v in results[through].items()}
    speed = {name: total / seconds for name, seconds in times.items()}
    ratio = speed["print"] / speed["plain"]
    t.row("print() of 1 KiB lines (MiB/s)", rate(speed["print"] / MiB, ""),
          f"f.write {rate(speed['plain'] / MiB, '')}", f"{ratio:.2f}x", ">= 0.8x", ratio >= 0.8)
    ratio = speed["emit"] / speed["plain"]
    t.row("ctx.emit() of 1 KiB lines (MiB/s)", rate(speed["emit"] / MiB, ""),
          f"f.write {rate(speed['plain'] / MiB, '')}", f"{ratio:.2f}x", ">= 0.8x", ratio >= 0.8)
    ratio = speed["emit"] / speed["raw"]
    t.row("   ctx.emit() beside an os.write() per line", rate(speed["emit"] / MiB, ""),
          f"os.write {rate(speed['raw'] / MiB, '')}", f"{ratio:.2f}x", "(same system calls)")
    r = results[big]
    grown = r["after"] - r["before"]
    t.row(f"child RSS before/after emitting {mb(big_total)}",
          f"{mb(r['before'])} / {mb(r['after'])}", f"peak {mb(r['peak'])}", f"+{mb(grown)}",
          "within 10 MiB", abs(grown) <= 10 * MiB and r["peak"] - r["before"] <= 10 * MiB)
    t.row(f"   its rate ({mb(big_total)} in 1 KiB emits)", rate(big_total / MiB / r["s"], " MiB/s"),
          "", "", "")

    # -- --follow latency -------------------------------------------------------------------
    lines = n["follow_lines"]
    say(f"jobs output --follow: {lines} lines emitted 200 ms apart")
    job_id = queue.enqueue("ticker", {"n": lines})
    latencies = []
    with serving(["--app", app, "--db", db, "--poll", "0.05"], db + ".log") as proc:
        follow = subprocess.Popen([PY, SCRIPT, "jobs", "output", str(job_id), "--follow",
                                   "--db", db], stdout=subprocess.PIPE, cwd=bench.dir)
        try:
            for raw in follow.stdout:
                read_at = time.time()
                if raw.startswith(b"tick "):
                    latencies.append(read_at - float(raw.split()[2]))
            follow.wait(30)
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait()
            follow.stdout.close()
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited {proc.returncode}: {log_tail(db + '.log')}")
    queue.close()
    if len(latencies) != lines:
        raise RuntimeError(f"the follower read {len(latencies)} of {lines} lines")
    p50 = statistics.median(latencies)
    t.row(f"ctx.emit -> line read from `jobs output --follow` (median / max of {lines})",
          f"{ms(p50)} / {ms(max(latencies))}", "", "", "median < 500 ms", p50 < 0.5)
    t.note(f"throughput: one job's child (serve --burst --slots 1) times, {n['output_rounds']} "
           f"rounds interleaved, median: {mb(total)} as 1 KiB lines through print() (fd 1 is the "
           f"job's output file; flushed at the end), ctx.emit(str), a buffered `open(..., 'a')`"
           f".write() loop and an os.write() loop appending to a file on the same filesystem")
    t.note("ctx.emit writes and flushes each call, as the spec asks (nothing held in the "
           "child beyond one write): its floor is a write() system call per line")
    t.note(f"RSS: VmRSS of the child read by the task itself before, every 64 MiB and after "
           f"{mb(big_total)} of 1 KiB ctx.emit calls")
    return t


# ======================================================================================
# metrics and pressure history (issue 12)
# ======================================================================================

def metrics_file(path, n):
    """n jobs as a long-running file holds them: 90% finished (done, some dead) over 12
    tasks, the rest queued over the four priorities."""
    prefill(path, n)
    conn = apsw.Connection(path)
    at = time.time()
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE jobs SET task = 'task' || (id % 12), priority = id % 4")
    conn.execute("UPDATE jobs SET state = CASE WHEN id % 20 = 0 THEN 'dead' ELSE 'done' END,"
                 " finished_at = ? WHERE id % 10 != 0", (at,))
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()


def section_metrics(bench):
    n = bench.n
    t = Table("7. metrics and pressure history")
    db = bench.path("metrics.db")
    say(f"a file of {n['metrics_jobs']:,} jobs")
    metrics_file(db, n["metrics_jobs"])
    with litequeue.Queue(db) as queue:
        queue.metrics_text()                                # warm the page cache
        times = [timed(queue.metrics_text) for _ in range(n["metrics_calls"])]
    p50, p99 = percentile(times, 50), percentile(times, 99)
    t.row(f"metrics_text(), {n['metrics_jobs'] // 1000}k jobs, p50", ms(p50), "", "",
          "< 50 ms", p50 < 0.050)
    t.row("   p99", ms(p99))

    say("metrics --textfile start-up")
    out = os.path.join(bench.dir, "litequeue.prom")
    commands = {"import": [PY, "-c", "import apsw, click"],
                "metrics": [PY, SCRIPT, "metrics", "--textfile", out, "--db", db],
                "module": [PY, "-m", "litequeue", "metrics", "--textfile", out, "--db", db]}
    walls = {name: [] for name in commands}
    for command in commands.values():
        subprocess.run(command, cwd=ROOT, capture_output=True, check=True)
    for _ in range(n["cli_runs"]):
        for name, command in commands.items():
            walls[name].append(timed(lambda: subprocess.run(command, cwd=ROOT,
                                                            capture_output=True, check=True)))
    med = {name: statistics.median(values) for name, values in walls.items()}
    t.row("`python litequeue.py metrics --textfile F`, same file", ms(med["metrics"]),
          f"import apsw, click {ms(med['import'])}", f"{med['metrics'] / med['import']:.2f}x")
    t.row("`python -m litequeue metrics --textfile F`", ms(med["module"]),
          f"import apsw, click {ms(med['import'])}", f"{med['module'] / med['import']:.2f}x")

    say("the cost of a pressure sample")
    sample_db = bench.path("samples.db")
    with litequeue.Queue(sample_db) as queue:
        owner = "bench:1:0"
        queue.register_supervisor(owner, "bench", ["heartbeat"], [])
        start = time.time() - litequeue.PRESSURE_HISTORY_S
        # A day of samples already there (17,280): the steady state, where each commit
        # adds one and deletes one.
        per_day = int(litequeue.PRESSURE_HISTORY_S / litequeue.PRESSURE_SAMPLE_S)
        queue.record_runs(owner, [], samples=[(start + i * litequeue.PRESSURE_SAMPLE_S, 20.0,
                                               "normal", 10 * MiB) for i in range(per_day)])
        at = start + litequeue.PRESSURE_HISTORY_S
        sample_s, heartbeat_s = [], []
        for i in range(n["sample_writes"]):
            at += litequeue.PRESSURE_SAMPLE_S
            sample_s.append(timed(lambda: queue.record_runs(
                owner, [], samples=[(at, 20.0, "normal", 10 * MiB)], at=at)))
            heartbeat_s.append(timed(lambda: queue.supervisor_heartbeat(
                owner, at, "normal", 20.0, [])))
        kept = len(queue.pressure_history())
    sample_p50, heartbeat_p50 = percentile(sample_s, 50), percentile(heartbeat_s, 50)
    t.row("a sample's commit (idle supervisor, a day of samples kept), p50", us(sample_p50),
          f"lease renewal {us(heartbeat_p50)}", f"{sample_p50 / heartbeat_p50:.2f}x")
    t.row("   per second of an idle supervisor (one per 5 s; a renewal per 2 s)",
          us(sample_p50 / litequeue.PRESSURE_SAMPLE_S),
          f"renewals {us(heartbeat_p50 / litequeue.SUPERVISOR_HEARTBEAT_S)}")
    t.row("samples kept after a day and more", f"{kept:,}", "", "", f"<= {per_day + 1:,}",
          kept <= per_day + 1)
    t.note("a busy supervisor's sample rides the commit its children's reports make anyway")
    t.note("metrics_text() is one scan of jobs (GROUP BY task, state, priority: no index "
           "covers it, and one would cost every enqueue and claim) plus index seeks: it grows "
           "with the file, ~10x for 1M jobs")
    t.note("the CLI rows include compiling litequeue.py when PYTHONDONTWRITEBYTECODE is set "
           "(see section 1), and the scan above")
    return t


# ======================================================================================
# main
# ======================================================================================

def section_dashboard(bench):
    """The dashboard's own process: idle RSS and CPU, and its routes' latency on a file of
    many jobs (tests/bench_dashboard.py is the same, standalone, with more options)."""
    import urllib.request
    from bench_dashboard import fill
    n = bench.n
    t = Table("8. dashboard: its own process, on a file of many jobs")
    db = bench.path("dashboard.db")
    say(f"a file of {n['dash_jobs']:,} jobs (80 % done, 10 % dead, some running)")
    fill(db, n["dash_jobs"])
    server = subprocess.Popen([PY, SCRIPT, "dashboard", "--db", db, "--bind", "127.0.0.1:0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = "http://127.0.0.1:" + server.stdout.readline().strip().rstrip("/").rsplit(":", 1)[1]
        process = psutil.Process(server.pid)
        time.sleep(1.0)
        say(f"idle dashboard over {n['dash_idle_s']:g}s")
        cpu0 = sum(process.cpu_times()[:2])
        time.sleep(n["dash_idle_s"])
        idle_cpu = (sum(process.cpu_times()[:2]) - cpu0) / n["dash_idle_s"]
        rss = process.memory_info().rss
        baseline = idle_rss_baseline()
        t.row("idle dashboard RSS", mb(rss), f"bare python+apsw+click+psutil {mb(baseline)}",
              f"{rss / baseline:.2f}x", "")
        t.row("idle dashboard CPU (% of one core)", f"{100 * idle_cpu:.2f}%", "", "", "")
        for route, target in (("/api/status", 0.050), ("/metrics", 0.050),
                              (f"/api/jobs/{n['dash_jobs'] // 2}", None)):
            say(f"GET {route} x {n['dash_requests']}")
            times = []
            for _ in range(n["dash_requests"]):
                t0 = time.perf_counter()
                with urllib.request.urlopen(url + route, timeout=30) as response:
                    response.read()
                times.append(time.perf_counter() - t0)
            p50 = percentile(times, 50)
            t.row(f"GET {route}, {n['dash_jobs'] // 1000}k jobs, p50 / p95",
                  f"{ms(p50)} / {ms(percentile(times, 95))}", "", "",
                  "p50 < 50 ms" if target else "", p50 < target if target else None)
    finally:
        server.terminate()
        server.wait(timeout=10)
    t.note("GET: sequential requests from this process over loopback; most of /api/status "
           "and /metrics is counting jobs by state and priority over every row")
    return t


RUNNERS = {"enqueue": section_enqueue, "supervisor": section_supervisor,
           "memory": section_memory, "isolation": section_isolation, "psi": section_psi,
           "retention": section_retention, "peers": section_peers,
           "output": section_output, "metrics": section_metrics,
           "dashboard": section_dashboard}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test)")
    parser.add_argument("--only", help="one section (or a comma-separated list): "
                        + ", ".join(SECTIONS))
    parser.add_argument("--dir", help="where to put the database files (default: $TMPDIR)")
    parser.add_argument("--keep-files", action="store_true", help="do not delete the files")
    parser.add_argument("--json", help="also write the tables to this JSON file")
    parser.add_argument("--fresh-peers", action="store_true",
                        help="rebuild the peers' virtualenv (section peers) before using it")
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
