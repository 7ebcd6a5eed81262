"""One Queue object shared by threads (a threaded web server, a thread pool) and by an
asyncio app: every call works, every job lands, and misuse is never "database unusable"."""

import asyncio
import concurrent.futures
import json
import socketserver
import threading
import time
import urllib.request
import wsgiref.simple_server

import apsw
import pytest

import litequeue


def _enqueue_from_threads(queue, threads, per_thread):
    """Each thread enqueues per_thread jobs on the one shared queue; all ids, in order."""
    start = threading.Barrier(threads)

    def produce(index):
        start.wait()        # all threads at once: the overlap is the point
        return [queue.enqueue("echo", {"thread": index, "n": n}) for n in range(per_thread)]

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return [job_id for ids in pool.map(produce, range(threads)) for job_id in ids]


def _count_jobs(path):
    with litequeue.Queue(path) as q:
        return q.stats()["jobs"]["queued"]


def test_sixteen_threads_share_one_queue(db_path):
    with litequeue.Queue(db_path, durable=False) as queue:
        ids = _enqueue_from_threads(queue, 16, 2000)
    assert len(ids) == len(set(ids)) == 32000
    assert _count_jobs(db_path) == 32000


def test_sixteen_threads_share_one_durable_queue(db_path):
    """The same with the default synchronous=FULL, where each commit waits for an fsync."""
    with litequeue.Queue(db_path) as queue:
        ids = _enqueue_from_threads(queue, 16, 50)
    assert len(set(ids)) == 800
    assert _count_jobs(db_path) == 800


def test_threads_do_not_leak_a_lowered_sync_into_a_durable_enqueue(db_path):
    """A claim commits unsynced (PRAGMA synchronous = NORMAL for its transaction): an enqueue
    from another thread must never run inside that window."""
    with litequeue.Queue(db_path) as queue:
        stop = threading.Event()
        seen = []

        def claimer():
            while not stop.is_set():
                queue.claim("owner-x", limit=1)

        def watcher():
            for _ in range(300):
                with queue._lock:
                    seen.append(queue.conn.execute("PRAGMA synchronous").fetchall()[0][0])
        threads = [threading.Thread(target=claimer), threading.Thread(target=watcher)]
        for t in threads:
            t.start()
        threads[1].join()
        stop.set()
        threads[0].join()
    assert set(seen) == {2}       # FULL whenever another thread can see the connection


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True
    request_queue_size = 128        # the listen backlog: 32 clients connect at once


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args):
        pass


def test_threaded_wsgi_server_shares_one_queue(db_path):
    """A real threaded WSGI server whose app enqueues on one Queue, 500 concurrent POSTs."""
    queue = litequeue.Queue(db_path)

    def app(environ, start_response):
        size = int(environ.get("CONTENT_LENGTH") or 0)
        payload = json.loads(environ["wsgi.input"].read(size))
        try:
            body = json.dumps({"id": queue.enqueue("echo", payload)}).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
        except Exception as exc:          # what a framework would turn into a 500
            body = repr(exc).encode()
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
        return [body]

    server = wsgiref.simple_server.make_server("127.0.0.1", 0, app,
                                               server_class=_ThreadingWSGIServer,
                                               handler_class=_QuietHandler)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    url = f"http://127.0.0.1:{server.server_port}/jobs"

    def post(n):
        request = urllib.request.Request(url, data=json.dumps({"n": n}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())["id"]
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    try:
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(post, range(500), timeout=120))
    finally:
        server.shutdown()
        server.server_close()
        queue.close()
    failures = [a for a in answers if a[0] != 200]
    assert failures == []
    assert len({job_id for _, job_id in answers}) == 500
    with litequeue.Queue(db_path) as q:
        assert sorted(j.payload["n"] for j in q.jobs(limit=None)) == list(range(500))


def test_aenqueue_keeps_the_event_loop_ticking(db_path):
    """200 awaited enqueues, each with its fsync, while a ticker task counts the loop's turns.
    Enqueues run on the loop itself would hold it from the first to the last: no tick."""
    queue = litequeue.Queue(db_path)

    async def main():
        ticks = []
        done = asyncio.Event()

        async def ticker():
            while not done.is_set():
                await asyncio.sleep(0.002)
                ticks.append(time.monotonic())

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0)                  # the ticker is waiting on its timer
        started = time.monotonic()
        ids = await asyncio.gather(*(queue.aenqueue("echo", {"n": n}) for n in range(200)))
        ended = time.monotonic()
        done.set()
        await ticking
        return ids, [t for t in ticks if started < t < ended], ended - started

    try:
        ids, ticks_during, took_s = asyncio.run(main())
    finally:
        queue.close()
    assert len(set(ids)) == 200
    assert _count_jobs(db_path) == 200
    assert len(ticks_during) >= 5, f"{len(ticks_during)} ticks in {took_s:.3f} s of enqueues"


def test_aenqueue_takes_enqueues_arguments(queue):
    job_id = asyncio.run(queue.aenqueue("echo", {"x": 1}, priority="high", unique="k"))
    again = asyncio.run(queue.aenqueue("echo", {"x": 2}, unique="k"))
    assert again == job_id
    assert queue.get(job_id).priority == "high"
    with pytest.raises(litequeue.BadPriority):
        asyncio.run(queue.aenqueue("echo", priority="urgent"))


def test_a_closed_queue_is_a_usage_error_not_an_unusable_database(db_path):
    queue = litequeue.Queue(db_path)
    queue.close()
    for call in (lambda: queue.enqueue("echo"), queue.stats, lambda: queue.get(1)):
        with pytest.raises(litequeue.Error) as caught:
            call()
        assert not isinstance(caught.value, litequeue.DatabaseUnusable)
        assert "closed" in str(caught.value)


def test_a_connection_closed_or_misused_behind_the_queue_is_a_usage_error(db_path):
    queue = litequeue.Queue(db_path)
    queue.conn.close()                  # not through Queue.close(): apsw's own error
    with pytest.raises(litequeue.QueueClosed):
        queue.enqueue("echo")
    with pytest.raises(litequeue.QueueClosed):
        queue.stats()
    misused = litequeue._translate(apsw.ThreadingViolationError("busy in another thread"),
                                   db_path)
    assert isinstance(misused, litequeue.UsageError)
    assert not isinstance(misused, litequeue.DatabaseUnusable)
