#!/usr/bin/env python3
"""The dashboard's cost: `/api/status` latency on a file of 100,000 jobs (target p50 under
50 ms) and the dashboard process's idle RSS and CPU. A script, not a test (pytest does not
collect it):

    python tests/bench_dashboard.py [--jobs 100000] [--requests 200] [--idle 20]

Measured on the 2-core test machine (100,000 jobs: 80 % done, 10 % dead, 4 running):
  idle (no browser): RSS 44.0 MiB, CPU 0.00 % of a core (serve_forever blocks in select)
  GET /api/status: p50 34.5 ms, p95 50.7 ms, 5.2 kB; GET /api/jobs/ID: p50 0.5 ms
  one open page polling every 2 s: CPU 1.9 % of a core, RSS 52 MiB
Nearly all of /api/status is Queue.status() itself (40 ms in process, of which stats()'s
GROUP BY state, priority over every row is 27 ms); what the dashboard adds (dead jobs,
events, breakers, limits) is under 1 ms.
"""

import argparse
import os
import warnings
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import litequeue  # noqa: E402
import psutil  # noqa: E402


def fill(path, jobs):
    """`jobs` jobs over 20 tasks and every priority: most done, some queued, dead, running."""
    queue = litequeue.Queue(path, durable=False)
    rand = random.Random(1)
    batch = []
    for i in range(jobs):
        batch.append({"task": f"task{i % 20}", "payload": {"n": i},
                      "priority": rand.choice(list(litequeue.PRIORITIES))})
        if len(batch) == 10_000:
            queue.enqueue_many(batch)
            batch = []
    if batch:
        queue.enqueue_many(batch)
    with queue._tx() as conn:                # spread the states as a busy week would
        conn.execute("UPDATE jobs SET state = 'done', finished_at = created_at + 1"
                     " WHERE id % 10 < 8")
        conn.execute("UPDATE jobs SET state = 'dead', finished_at = created_at + 1,"
                     " error = 'Traceback...\nValueError: bad input ' || id WHERE id % 10 = 8")
    for job in queue.claim("bench", limit=4):
        queue.set_progress(job.id, "bench", job.attempts, 1, 4)
    queue.close()


def main():
    warnings.simplefilter("ignore", litequeue.UnknownTaskWarning)
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "bench.db")
        started = time.perf_counter()
        fill(path, args.jobs)
        print(f"filled {args.jobs:,} jobs in {time.perf_counter() - started:.1f}s")
        server = subprocess.Popen([sys.executable, os.path.join(ROOT, "litequeue.py"),
                                   "dashboard", "--db", path, "--bind", "127.0.0.1:0"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            port = re.search(r":(\d+)/$", server.stdout.readline().strip()).group(1)
            url = f"http://127.0.0.1:{port}"
            process = psutil.Process(server.pid)
            time.sleep(1.0)
            cpu_before = sum(process.cpu_times()[:2])
            time.sleep(args.idle)
            idle_cpu = (sum(process.cpu_times()[:2]) - cpu_before) / args.idle * 100
            idle_rss = process.memory_info().rss
            print(f"idle (no browser): RSS {idle_rss / 2**20:.1f} MiB, "
                  f"CPU {idle_cpu:.2f}% of a core over {args.idle:g}s")
            size = None
            for route in ("/api/status", f"/api/jobs/{args.jobs // 2}"):
                times = []
                for _ in range(args.requests):
                    t0 = time.perf_counter()
                    with urllib.request.urlopen(url + route, timeout=30) as response:
                        body = response.read()
                    times.append((time.perf_counter() - t0) * 1000)
                    size = len(body)
                times.sort()
                p50 = statistics.median(times)
                p95 = times[int(len(times) * 0.95) - 1]
                target = "  (target p50 < 50 ms)" if route == "/api/status" else ""
                print(f"GET {route}: p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {times[-1]:.1f} ms,"
                      f" {size:,} bytes{target}")
            cpu_before = sum(process.cpu_times()[:2])
            polls = 0
            t_end = time.monotonic() + args.idle
            while time.monotonic() < t_end:             # one open page: a poll every 2 s
                with urllib.request.urlopen(url + "/api/status", timeout=30) as response:
                    response.read()
                polls += 1
                time.sleep(2.0)
            page_cpu = (sum(process.cpu_times()[:2]) - cpu_before) / args.idle * 100
            print(f"one open page ({polls} polls of /api/status): CPU {page_cpu:.2f}% of a core,"
                  f" RSS {process.memory_info().rss / 2**20:.1f} MiB")
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
