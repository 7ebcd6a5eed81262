"""systemd's notify protocol, read from a real datagram socket the test binds: READY=1 once
the supervisor is registered, WATCHDOG=1 as its loop turns, STOPPING=1 at the first signal."""

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import apsw
import pytest

import litequeue
from conftest import SCRIPT

Notifier = litequeue._SystemdNotifier


@pytest.fixture
def listener():
    """A bound AF_UNIX datagram socket, as systemd's $NOTIFY_SOCKET is (a short directory:
    a socket path must fit in 108 bytes)."""
    directory = tempfile.mkdtemp(prefix="lq-notify-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.01)
    yield sock, path
    sock.close()
    os.unlink(path)
    os.rmdir(directory)


def received(sock):
    """Every datagram waiting on the socket now."""
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except (socket.timeout, BlockingIOError):
            return messages


def read_until(sock, wanted, timeout=30.0):
    """Datagrams in the order they came, up to and including the first equal to wanted."""
    messages, deadline = [], time.monotonic() + timeout
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            messages.append(sock.recv(4096).decode())
        except socket.timeout:
            continue
        if messages[-1] == wanted:
            return messages
    raise AssertionError(f"no {wanted!r} within {timeout}s; got {messages}")


# --------------------------------------------------------------------------------------
# the notifier alone
# --------------------------------------------------------------------------------------

def test_without_notify_socket_it_does_nothing():
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.next_tick() == float("inf")     # it never shortens the loop's sleep
    notifier.ready()
    notifier.turn(0.0, stopping=True)
    notifier.stopping()


def test_addresses_and_watchdog_interval_from_the_environment():
    assert Notifier.from_environ({"NOTIFY_SOCKET": "/run/systemd/notify"}).address == \
        "/run/systemd/notify"
    # A leading @ is the abstract namespace: a NUL byte in the address.
    assert Notifier.from_environ({"NOTIFY_SOCKET": "@lq/notify"}).address == "\0lq/notify"
    # Neither a path nor @ (vsock:..., a relative path): not understood, so not used.
    assert not Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled

    # No watchdog asked: still a WATCHDOG=1 every few seconds, harmless and cheap.
    plain = Notifier.from_environ({"NOTIFY_SOCKET": "/x"})
    assert plain.watchdog_every_s == litequeue.WATCHDOG_EVERY_S
    # WatchdogSec=30s: at most every few seconds, well within half of it.
    thirty = Notifier.from_environ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000"})
    assert thirty.watchdog_every_s <= min(litequeue.WATCHDOG_EVERY_S, 30 / 2)
    # A short watchdog: a quarter of it.
    short = Notifier.from_environ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000"})
    assert short.watchdog_every_s == pytest.approx(0.25)
    # WATCHDOG_PID names another process: the watchdog is not ours to feed more often.
    other = Notifier.from_environ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000",
                                   "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_every_s == litequeue.WATCHDOG_EVERY_S
    ours = Notifier.from_environ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000",
                                  "WATCHDOG_PID": str(os.getpid())})
    assert ours.watchdog_every_s == pytest.approx(0.25)
    garbled = Notifier.from_environ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "soon"})
    assert garbled.watchdog_every_s == litequeue.WATCHDOG_EVERY_S


def test_ready_watchdog_rate_limited_and_stopping_once(listener):
    sock, path = listener
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    assert notifier.watchdog_every_s == pytest.approx(0.5)
    notifier.ready()
    for tick in (100.0, 100.1, 100.4, 100.5, 100.6, 101.2):    # the loop's turns
        notifier.turn(tick, stopping=False)
    assert received(sock) == ["READY=1", "WATCHDOG=1", "WATCHDOG=1", "WATCHDOG=1"]
    assert notifier.next_tick() == pytest.approx(101.7)
    # The first turn that sees the stop says so, once; the watchdog goes on.
    notifier.turn(101.3, stopping=True)
    notifier.turn(101.8, stopping=True)
    notifier.stopping()                        # on the way out: already said
    assert received(sock) == ["STOPPING=1", "WATCHDOG=1"]


def test_abstract_namespace_socket():
    name = f"litequeue-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(0.01)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        notifier.ready()
        notifier.stopping()
        assert received(sock) == ["READY=1", "STOPPING=1"]


def test_a_failed_send_is_logged_once_and_never_raised(tmp_path, caplog):
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.WARNING, logger="litequeue"):
        notifier.ready()
        for tick in range(5):
            notifier.turn(float(tick) * 10, stopping=tick > 2)
        notifier.stopping()
    warnings = [r.getMessage() for r in caplog.records if r.name == "litequeue"]
    assert len(warnings) == 1 and "nobody-listens" in warnings[0], warnings


# --------------------------------------------------------------------------------------
# the real supervisor, as systemd runs it
# --------------------------------------------------------------------------------------

def start_serve(db, notify_socket, *args, watchdog_usec="1000000"):
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": watchdog_usec}
    env.pop("WATCHDOG_PID", None)
    return subprocess.Popen([sys.executable, SCRIPT, "serve", "--db", str(db), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def supervisors_registered(db):
    conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute("SELECT count(*) FROM supervisors").fetchall()[0][0]
    finally:
        conn.close()


def serve_and_stop(db, sock, address, *args):
    """READY=1 first (registered by then), two or more WATCHDOG=1 while idle, STOPPING=1
    after SIGTERM, then exit 0."""
    serve = start_serve(db, address, *args)
    try:
        before_ready = read_until(sock, "READY=1")
        assert before_ready == ["READY=1"]
        assert supervisors_registered(db) == 1
        t0 = time.monotonic()
        read_until(sock, "WATCHDOG=1")
        watchdogs = read_until(sock, "WATCHDOG=1")
        assert watchdogs == ["WATCHDOG=1"]
        # WATCHDOG_USEC=1 s: fed at least every half of it, with room to spare.
        assert time.monotonic() - t0 < 1.0
        serve.send_signal(signal.SIGTERM)
        tail = read_until(sock, "STOPPING=1")
        assert set(tail) <= {"WATCHDOG=1", "STOPPING=1"}
        code = serve.wait(timeout=30)
    finally:
        if serve.poll() is None:
            serve.kill()
        _, stderr = serve.communicate(timeout=30)
    assert code == 0, stderr
    assert "READY=1" not in received(sock)
    return stderr


def test_serve_notifies_ready_watchdog_and_stopping(tmp_path, listener):
    sock, path = listener
    serve_and_stop(tmp_path / "q.db", sock, path)


def test_serve_feeds_the_watchdog_even_with_a_long_poll(tmp_path, listener):
    # --poll 30 would let an idle loop sleep 30 s: the watchdog bounds the sleep instead.
    sock, path = listener
    serve_and_stop(tmp_path / "q.db", sock, path, "--poll", "30")


def test_serve_notifies_an_abstract_namespace_socket(tmp_path):
    name = f"litequeue-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        serve_and_stop(tmp_path / "q.db", sock, "@" + name)


def test_serve_without_notify_socket_is_unchanged(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    serve = subprocess.Popen([sys.executable, SCRIPT, "serve", "--db", str(tmp_path / "q.db"),
                              "--burst"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    _, stderr = serve.communicate(timeout=60)
    assert serve.returncode == 0, stderr
    assert "systemd" not in stderr


# --------------------------------------------------------------------------------------
# MemoryDenyWriteExecute=yes in examples/litequeue.service
# --------------------------------------------------------------------------------------

# Run the rest of argv with the kernel's own W^X rule (PR_SET_MDWE, Linux 6.3+), the rule
# MemoryDenyWriteExecute= enforces with seccomp: no mapping both writable and executable.
UNDER_MDWE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:          # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(99)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def test_supervisor_and_children_run_under_memory_deny_write_execute(tmp_path):
    probe = subprocess.run([sys.executable, "-c", UNDER_MDWE, "-c",
                            "import mmap; mmap.mmap(-1, 4096, prot=7)"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode == 99:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    assert "PermissionError" in probe.stderr       # the rule holds: W+X is refused
    db = tmp_path / "q.db"
    with litequeue.Queue(db) as queue:
        job_id = queue.enqueue("echo", {"under": "mdwe"})
    serve = subprocess.run([sys.executable, "-c", UNDER_MDWE, SCRIPT, "serve", "--db", str(db),
                            "--burst"], capture_output=True, text=True, timeout=60)
    assert serve.returncode == 0, serve.stderr
    with litequeue.Queue(db) as queue:
        job = queue.get(job_id)
    assert (job.state, job.error) == ("done", None)
