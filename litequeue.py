"""litequeue: an embedded work queue that will not take down the machine it runs on.

One SQLite file (WAL, through apsw) holds jobs, priorities, leases, retries, results,
checkpoints and circuit breakers. A supervisor runs every job in its own child process under
OS rlimits and watches memory: under pressure it sheds low-value work, checkpoints and pauses
running work, and resumes it when pressure falls. No server, no Redis, no network.

    from litequeue import Queue, Supervisor

    queue = Queue("jobs.db")

    @queue.task(priority="normal", max_attempts=3, memory_limit="200M")
    def summarize(ctx, doc_id):
        state = ctx.checkpoint or {"page": 0}
        while state["page"] < 100:
            state["page"] += 1
            ctx.save(state)            # durable; the job may be paused here and resumed later
        return {"pages": state["page"]}

    summarize.enqueue(doc_id=7)
    Supervisor(queue, slots=2, memory_budget="1G").run()

How the pieces talk:

    producers (app, cron: `litequeue.py enqueue`)
            |  INSERT ... (BEGIN IMMEDIATE)
            v
    +---------------- jobs.db (SQLite, WAL) -----------------+
    | jobs  events  tasks  breakers  supervisors  meta       |
    +--------------------------------------------------------+
            ^  one transaction per turn of its loop: what every child reported, the
            |  endings and decisions, the next claims (the only writer of its jobs)
    Supervisor --fork / pipe: job, ack--> child (rlimits) --runs--> task(ctx, **payload)
               <--pipe: started, progress, checkpoint, result, error--
       polls memory pressure and each child's RSS; SIGUSR1 asks a child to stop at its
       next ctx.save(); SIGKILL after the grace period; children die with the supervisor.
       A child never opens the database.
"""

if __name__ == "__main__":
    # Run as `python litequeue.py`, this file is __main__. Hand over at once to the module
    # imported by its name (from its cached bytecode), so that user code
    # (`from litequeue import Queue`), the supervisor and its children share one module
    # object, one Queue class and one exception tree, and this body is not run twice.
    import sys
    if sys.argv[1:2] == ["serve"] and __spec__ is None and sys.executable:   # a file, not -m
        # A supervisor runs for months: start it afresh (same pid, same sys.path, same
        # interpreter options) from the module's cached bytecode. Compiling this file as a
        # script left its code and the compiler's fragmented heap in the supervisor's
        # memory for good: idle RSS measured 30.7 MiB that way, 23.1 MiB this way.
        import os
        options = sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv)]   # -X, -W, -O...
        code = (f"import sys; sys.path[0] = {sys.path[0]!r}; sys.argv[0] = {sys.argv[0]!r}; "
                f"import litequeue; sys.exit(litequeue.main())")
        os.execv(sys.executable, [sys.executable, *options, "-c", code, *sys.argv[1:]])
    import litequeue
    sys.exit(litequeue.main())

import contextlib
import errno
import functools
import io
import json
import math
import os
import random
import signal
import sys
import threading
import time

import apsw

__version__ = "0.1.0"
__all__ = (
    "Queue", "Supervisor", "Task", "Job", "Context",
    "Error", "BadInput", "UnknownTask", "BadPriority", "BadPayload", "JobNotFound",
    "InvalidState", "QueueFull", "LeaseLost", "DatabaseUnusable", "OutputRefused", "UsageError",
    "QueueClosed",
    "StopRequested", "Permanent", "UnknownTaskWarning", "SupervisorOptions", "parse_size",
    "parse_duration", "main",
)

class _Log:
    """The "litequeue" logger, imported on first use: `litequeue.py enqueue` from cron never
    pays for the logging package."""

    def __getattr__(self, name):
        import logging
        return getattr(logging.getLogger("litequeue"), name)


log = _Log()


# ======================================================================================
# Constants
# ======================================================================================

PRIORITIES = {"critical": 0, "high": 1, "normal": 2, "low": 3}
PRIORITY_NAMES = {value: name for name, value in PRIORITIES.items()}
CRITICAL, HIGH, NORMAL, LOW = 0, 1, 2, 3

QUEUED, RUNNING, DONE, DEAD, CANCELLED, SKIPPED = (
    "queued", "running", "done", "dead", "cancelled", "skipped")
STATES = (QUEUED, RUNNING, DONE, DEAD, CANCELLED, SKIPPED)
FINAL_STATES = (DONE, DEAD, CANCELLED, SKIPPED)

LEVELS = ("normal", "skip", "preempt", "emergency")

EXIT_OK, EXIT_BAD_INPUT, EXIT_QUEUE_FULL, EXIT_DB_UNUSABLE = 0, 2, 3, 4
EXIT_CHILD_STOPPED = 75          # a child that stopped at a checkpoint because it was asked
EXIT_INTERRUPTED = 130           # Ctrl-C, as a shell reports a process SIGINT ended
# How a run that did not finish done ends, besides cancelled: the queue then decides the
# state (a failure is retried while attempts remain; a requeue may be charged an attempt).
ENDING_FAILED, ENDING_REQUEUED = "failed", "requeued"

SCHEMA_VERSION = 5
APPLICATION_ID = 0x4C517565      # "LQue" in the SQLite header: marks the file as ours
MIGRATIONS = {                   # {version: SQL taking a file from version to version + 1}
    1: "ALTER TABLE tasks ADD COLUMN breaker_failures INTEGER;"
       "ALTER TABLE tasks ADD COLUMN breaker_window_s REAL;"
       "DROP INDEX events_at;"
       "DROP INDEX jobs_task_state;"
       "CREATE INDEX jobs_task_queue ON jobs (task, priority, due_at, id)"
       " WHERE state = 'queued';",
    2: "ALTER TABLE jobs ADD COLUMN overrides INTEGER NOT NULL DEFAULT 7;",
    3: "CREATE TABLE pressure_samples (id INTEGER PRIMARY KEY, at REAL NOT NULL,"
       " supervisor TEXT NOT NULL, pressure REAL NOT NULL, level TEXT NOT NULL,"
       " tree_bytes INTEGER);"
       "CREATE INDEX pressure_samples_at ON pressure_samples (at);"
       "CREATE TABLE finished_counts (task TEXT NOT NULL, state TEXT NOT NULL,"
       " n INTEGER NOT NULL, PRIMARY KEY (task, state)) WITHOUT ROWID;",
    4: "ALTER TABLE supervisors ADD COLUMN isolation TEXT;",
}

MiB = 1 << 20
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_MEMORY_LIMIT_BYTES = 400 * MiB
DEFAULT_BUSY_TIMEOUT_S = 10.0
BACKOFF_BASE_S, BACKOFF_CAP_S = 1.0, 300.0
DEFAULT_AGE_S = 600.0            # serve --age: a job waiting this long is claimed one priority up
ROOM_WAIT_FIRST_S, ROOM_WAIT_MAX_S = 0.01, 0.5   # a producer waiting on a full queue tries
                                                 # again after this, doubling up to that
MAX_PAYLOAD_BYTES = 1 * MiB      # payloads, results and checkpoints alike
MAX_ERROR_CHARS = 64 * 1024      # a job's error text: its start and its end beyond this
MAX_NAME_CHARS = 200             # task names and unique keys
LEASE_S = 30.0                   # a supervisor of another host silent this long is gone
CHILD_START_DEADLINE_S = 10.0   # a child not running its task by then is stuck
CHILD_GROWTH_LIMIT_BYTES = 32 * MiB  # a reused child grown this much since fork is replaced
CHILD_IDLE_S = 30.0             # a reused child idle this long is let go, its memory freed
PROGRESS_EVERY_S = 0.2          # a task's progress is sent at most this often (and its last)
CHANNEL_BATCH_S = 0.002         # while children keep reporting, read them this often
SUPERVISOR_HEARTBEAT_S = 2.0    # lease renewal: one small write, not an fsync a second
WATCHDOG_EVERY_S = 5.0          # systemd's WATCHDOG=1 at most this often (or a quarter of
                                # WatchdogSec when that is shorter)
BREAKER_FAILURES, BREAKER_WINDOW_S = 3, 60.0
PRESSURE_SAMPLE_S = 5.0         # a supervisor records its memory pressure this often:
                                # with PRESSURE_HISTORY_S, ~17k rows (~1 MB) a supervisor
PRESSURE_HISTORY_S = 24 * 3600.0
MAX_PENDING_SAMPLES = 60        # samples kept while commits fail (a busy file): 5 minutes
OUTPUT_DIR_SUFFIX = "-output"    # jobs.db -> jobs.db-output/<id>.log
OUTPUT_MARKER = "--- litequeue:"  # opens the marker line of each attempt in a job's output
DEFAULT_OUTPUT_LIMIT = "100M"   # one job's output; past it the job is stopped
OUTPUT_BUFFER_BYTES = 1 << 16  # a child's sys.stdout buffer (see _JobStreams)
BREAKER_COOLDOWN_S, BREAKER_MAX_COOLDOWN_S = 30.0, 600.0


# ======================================================================================
# Exceptions
# ======================================================================================

class Error(Exception):
    """Base of every error litequeue raises."""
    exit_code = 1


class BadInput(Error, ValueError):
    """An argument is not acceptable; nothing was written."""
    exit_code = EXIT_BAD_INPUT


class UnknownTask(BadInput):
    """No task of that name is registered here."""


class BadPriority(BadInput):
    """Priority is not one of critical, high, normal, low."""


class BadPayload(BadInput):
    """A payload, result or checkpoint is not JSON, or is too large."""


class JobNotFound(BadInput):
    """No job with that id."""


class InvalidState(BadInput):
    """The job is not in a state that allows this operation."""


class QueueFull(Error):
    """max_depth jobs are already queued: backpressure, nothing was written."""
    exit_code = EXIT_QUEUE_FULL


class LeaseLost(Error):
    """The job is no longer running under this lease (recovered, cancelled, finished)."""


class DatabaseUnusable(Error):
    """The file is not a usable litequeue database (foreign, corrupt, newer, locked, full)."""
    exit_code = EXIT_DB_UNUSABLE

    def __init__(self, message, orig=None, waitable=False):
        super().__init__(message)
        self.orig = orig
        self.waitable = waitable    # busy, locked or full: it may pass; worth waiting out


class OutputRefused(Error):
    """A job output directory that is not safe to write through: a symlink, another user's,
    or open to others."""
    exit_code = EXIT_DB_UNUSABLE


class UsageError(Error):
    """The Queue was used in a way it cannot be: a bug in the calling code, not the file."""


class QueueClosed(UsageError):
    """The Queue was closed; open a new one."""


class StopRequested(BaseException):
    """Raised by ctx.save() when a stop was asked: unwinds the task to the runner.

    A BaseException so that a task's `except Exception` cannot swallow it."""


class UnknownTaskWarning(UserWarning):
    """A job was enqueued for a task no code has declared to this file (a typo?)."""


class Permanent(Exception):
    """Raised by a task to fail for good at once: the job ends dead with this reason, and
    the breaker does not count it (the input's fault, not the task's health)."""


# ======================================================================================
# Small helpers: clock, JSON, sizes, durations
# ======================================================================================

def now():
    """Epoch seconds. Every timestamp comes from here, so tests can freeze or shift it."""
    return time.time()


def dumps_json(value, what="payload"):
    """Strict JSON text (no NaN), at most MAX_PAYLOAD_BYTES."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise BadPayload(f"{what} is not JSON: {exc}") from None
    except RecursionError:
        raise BadPayload(f"{what} is nested too deeply to be JSON") from None
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise BadPayload(f"{what} is not JSON: it holds a lone surrogate (not UTF-8)") from None
    if size > MAX_PAYLOAD_BYTES:
        raise BadPayload(f"{what} is too large: {size} bytes ({format_bytes(size)}); the limit "
                         f"is {format_bytes(MAX_PAYLOAD_BYTES)} ({MAX_PAYLOAD_BYTES} bytes)")
    return text


def loads_json(text, what="payload"):
    """Parse JSON text given by a user; errors are BadPayload."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, TypeError) as exc:
        raise BadPayload(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadPayload(f"{what} is nested too deeply") from None


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed")


class UnreadableValue(ValueError):
    """A JSON column of a job row that does not parse (the file was written by other means)."""


def _stored_json(text, what):
    """JSON read back from the file, or None. Written by dumps_json, it parses; a row written
    by other means may not: UnreadableValue, so that one row cannot crash a reader."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError) as exc:
        shown = text if isinstance(text, str) else repr(text)
        raise UnreadableValue(f"the {what} stored in the file is not valid JSON "
                              f"({type(exc).__name__}): {_last_line(shown)[:80]!r}") from None


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(value, what="size"):
    """Bytes from 400M, 1G, 512MiB, 1.5GB or a byte count; units are binary."""
    if isinstance(value, bool):
        raise BadInput(f"{what}: {value!r} is not a size")
    if isinstance(value, (int, float)):
        number, unit = value, ""
    else:
        text = str(value).strip().lower()
        for suffix in ("ib", "b", "i"):
            if text.endswith(suffix) and text[:-len(suffix)][-1:] in "kmgt":
                text = text[:-len(suffix)]
                break
        unit = text[-1:] if text[-1:] in "kmgt" else ""
        number = text[:len(text) - len(unit)].strip()
        try:
            number = float(number)
        except ValueError:
            raise BadInput(f"{what}: {value!r} is not a size (try 400M, 1G, 512MiB)") from None
    size = number * _SIZE_UNITS[unit]
    if not (size == size and 0 < size < float(1 << 62)):
        raise BadInput(f"{what}: {value!r} is not a positive size below 4 EiB")
    if size != int(size):                       # 0.5 was silently 0 bytes, 0.1M 104857
        raise BadInput(f"{what}: {value!r} is not a whole number of bytes (try 400M, 1G, 512MiB)")
    return int(size)


def parse_memory_size(value, what="memory size"):
    """parse_size(), for memory: at least 1 MiB, as no job runs in less. A bare `400` is
    400 bytes, surely meant as 400M: the message says so."""
    size = parse_size(value, what)
    if size < MiB:
        bare = not isinstance(value, str) or str(value).strip().isdigit()
        hint = f"; did you mean {str(value).strip()}M?" if bare else " (try 400M, 1G, 512MiB)"
        raise BadInput(f"{what}: {value!r} is {size} bytes, under 1 MiB{hint}")
    return size


def parse_duration(value, what="duration", allow_zero=True):
    """Seconds from 30s, 5m, 2h, 7d, 1w or a number of seconds."""
    if isinstance(value, bool):
        raise BadInput(f"{what}: {value!r} is not a duration")
    if isinstance(value, (int, float)):
        number, unit = value, ""
    else:
        text = str(value).strip().lower()
        unit = text[-1:] if text[-1:] in "smhdw" else ""
        try:
            number = float(text[:len(text) - len(unit)])
        except ValueError:
            raise BadInput(f"{what}: {value!r} is not a duration (try 30s, 5m, 7d)") from None
    seconds = number * _DURATION_UNITS[unit]
    if not (seconds == seconds and abs(seconds) < 1e12):           # NaN, inf, absurd
        raise BadInput(f"{what}: {value!r} is not a finite duration")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise BadInput(f"{what}: {value!r} must be {'>= 0' if allow_zero else '> 0'}")
    return float(seconds)


def parse_priority(value):
    """0..3 from a name or a number."""
    if isinstance(value, str) and value.strip().lower() in PRIORITIES:
        return PRIORITIES[value.strip().lower()]
    if isinstance(value, int) and not isinstance(value, bool) and value in PRIORITY_NAMES:
        return value
    raise BadPriority(f"unknown priority {value!r}: use critical, high, normal or low")


def parse_positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 1 << 31:
        raise BadInput(f"{what}: {value!r:.40} must be a whole number from 1 to 2**31 - 1")
    return value


def _is_utf8(text):
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_job_options(priority=None, unique=None, delay=None, ttl=None, max_attempts=None,
                      timeout=None, memory_limit=None, flags=False):
    """Per-job overrides of enqueue, validated; None where not given (the task's default).
    Errors name the parameters (memory_limit), or with flags=True the command line's
    options (--memory-limit)."""
    def named(name):
        return f"--{name.replace('_', '-')}" if flags else name
    return {
        "priority": None if priority is None else parse_priority(priority),
        "unique": (unique if unique is None or isinstance(unique, bool)
                   else check_name(unique, f"{named('unique')} key")),
        "delay_s": 0.0 if delay is None else parse_duration(delay, named("delay")),
        "ttl_s": None if ttl is None else parse_duration(ttl, named("ttl"), allow_zero=False),
        "max_attempts": (None if max_attempts is None
                         else parse_positive_int(max_attempts, named("max_attempts"))),
        "timeout_s": None if timeout is None else parse_duration(timeout, named("timeout"),
                                                                 allow_zero=False),
        "memory_limit_bytes": (None if memory_limit is None
                               else parse_memory_size(memory_limit, named("memory_limit"))),
    }


def _checked_input(task, payload=None, flags=False, **options):
    """(task, payload as JSON, options) of an enqueue, all validated before any write."""
    return check_name(task), dumps_json(payload), parse_job_options(flags=flags, **options)


def check_name(value, what="task name"):
    if (not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS or "\0" in value
            or not _is_utf8(value)):
        raise BadInput(f"{what} must be a non-empty string of at most {MAX_NAME_CHARS} "
                       f"characters without NUL, not {value!r:.60}")
    return value


def format_bytes(n):
    return f"{n / MiB:.0f} MiB" if n is not None else "-"


def default_db_path():
    return os.environ.get("LITEQUEUE_DB") or "litequeue.db"


def output_dir_of(db_path):
    """Where a database keeps its jobs' output: `jobs.db` -> `jobs.db-output/`."""
    return f"{db_path}{OUTPUT_DIR_SUFFIX}"


def output_file_of(directory, job_id):
    return os.path.join(directory, f"{int(job_id)}.log")


def check_output_dir(path, *, create):
    """Make sure `path` is an output directory safe to write through: a real directory (not a
    symlink), ours, closed to others (it may hold what tasks print: secrets). Made mode 0700
    when missing and `create`. Returns False when it is missing (and not made); raises
    OutputRefused, or OSError when it cannot be made."""
    import stat
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            return False
        with contextlib.suppress(FileExistsError):      # another process made it meanwhile
            os.mkdir(path, 0o700)
        st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise OutputRefused(f"output directory {path} is a symlink: refused")
    if not stat.S_ISDIR(st.st_mode):
        raise OutputRefused(f"output directory {path} is not a directory: refused")
    if st.st_uid != os.getuid():
        raise OutputRefused(f"output directory {path} is owned by uid {st.st_uid}, not "
                            f"{os.getuid()}: refused")
    if st.st_mode & 0o077:
        raise OutputRefused(f"output directory {path} is open to others (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}; make it 0700): refused")
    return True


def attempt_marker(job, at):
    """The line that opens each attempt's output: which attempt, and why it started (derived
    from the row: attempts used, preemptions, a checkpoint to resume from)."""
    import datetime
    resumed = " from its checkpoint" if job.checkpoint is not None else ""
    if job.attempts > 1:
        why = f"retry{resumed}"
    elif job.preemptions:
        why = f"resumed after preemption{resumed or ' (no checkpoint)'}"
    elif job.checkpoint is not None or job.recoveries:
        why = f"resumed after a stop{resumed}"
    else:
        why = "first run"
    when = datetime.datetime.fromtimestamp(at).isoformat(timespec="seconds")
    return (f"{OUTPUT_MARKER} job {job.id} {job.task} attempt {job.attempts}/"
            f"{job.max_attempts}: {why} ({when}, pid {os.getpid()}) ---\n").encode()


# ======================================================================================
# Storage: connect, transactions, schema and migrations
# ======================================================================================

# apsw's errors for a connection used the wrong way: the caller's bug, never the file's.
# (The exit code of "database unusable" also means corruption: misuse must not look like it.)
_MISUSE_ERRORS = (apsw.ThreadingViolationError, apsw.ForkingViolationError,
                  apsw.CursorClosedError, apsw.ExecutionCompleteError,
                  apsw.IncompleteExecutionError, apsw.MisuseError)


def _translate(exc, path):
    """A DatabaseUnusable with a message a user can act on, keeping apsw's error; a
    UsageError (QueueClosed) when the connection was misused rather than the file bad."""
    if isinstance(exc, apsw.ConnectionClosedError):
        error = QueueClosed(f"the Queue on {path} was closed; open a new one")
        error.orig = exc
        return error
    if isinstance(exc, _MISUSE_ERRORS):
        error = UsageError(f"the connection to {path} was used the wrong way: {exc}")
        error.orig = exc
        return error
    reasons = [
        (apsw.BusyError, "is locked by another process past the busy timeout"),
        (apsw.LockedError, "is locked"),
        (apsw.FullError, "cannot grow: the disk is full"),
        (apsw.ReadOnlyError, "is read-only (check the file's and its directory's permissions)"),
        (apsw.NotADBError, "is not a SQLite database"),
        (apsw.CorruptError, "is corrupt"),
        (apsw.CantOpenError, "cannot be opened (missing directory or no permission)"),
        (apsw.IOError, "had an I/O error"),
        (apsw.PermissionsError, "cannot be accessed: permission denied"),
    ]
    if isinstance(exc, (apsw.IOError, apsw.CantOpenError)) and _disk_full(path):
        # Making the -shm index on a full disk fails as an I/O error, not SQLITE_FULL.
        return DatabaseUnusable(f"database {path} cannot grow: the disk is full", orig=exc,
                                waitable=True)
    for kind, text in reasons:
        if isinstance(exc, kind):
            return DatabaseUnusable(f"database {path} {text}", orig=exc, waitable=isinstance(
                exc, (apsw.BusyError, apsw.LockedError, apsw.FullError)))
    return DatabaseUnusable(f"database {path} is unusable: {exc}", orig=exc)


def _disk_full(path):
    """Is the filesystem holding path (nearly) out of space for this process?"""
    try:
        fs = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    free_blocks = fs.f_bfree if os.geteuid() == 0 else fs.f_bavail     # root may use reserve
    return free_blocks * fs.f_frsize < 128 * 1024


def _schema_sql():
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema.sql")) as f:
        return f.read()


def _create_database(path):
    """Make a complete litequeue file at path, owner-only, atomically.

    The file is built under a temporary name and linked into place, so no other process
    ever sees a half-made file, and two processes creating it at once both end up with the
    same complete file."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise DatabaseUnusable(f"cannot create database {path}: directory {directory} does not exist")
    temp = f"{path}.{os.getpid()}.{random.randrange(1 << 30)}.new"
    try:
        os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise DatabaseUnusable(f"cannot create database {path}: {exc.strerror}") from None
    try:
        conn = apsw.Connection(temp)
        try:
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")   # purge can give pages back
            conn.execute("PRAGMA journal_mode = WAL")
            with _transaction(conn, temp):
                conn.execute(_schema_sql())
                for _, defaults in builtin_catalogue():
                    _store_catalogue_row(conn, defaults, now())
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        finally:
            conn.close()
        try:
            os.link(temp, path)
        except FileExistsError:
            pass                      # another process made it first: use theirs
        except OSError:               # no hard links here (vfat on an SD card): rename
            if not os.path.exists(path):
                os.replace(temp, path)
    except apsw.Error as exc:
        raise _translate(exc, path) from None
    finally:
        for leftover in (temp, temp + "-wal", temp + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def _check_identity(conn, path):
    """Refuse foreign, empty and newer files; migrate older ones. Reads only, unless migrating."""
    app_id = conn.execute("PRAGMA application_id").fetchall()[0][0]
    version = conn.execute("PRAGMA user_version").fetchall()[0][0]
    if app_id != APPLICATION_ID:
        tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()[0][0]
        what = "an empty file" if not tables else "a SQLite database of another program"
        raise DatabaseUnusable(f"{path} is {what}, not a litequeue database; refusing to touch it")
    if version > SCHEMA_VERSION:
        raise DatabaseUnusable(f"{path} has schema version {version}, newer than this "
                               f"litequeue ({__version__}, schema {SCHEMA_VERSION}); upgrade litequeue")
    if version < SCHEMA_VERSION:
        _migrate(conn, path, version)


def _migrate(conn, path, version):
    """Walk the user_version ladder one step at a time, all in one transaction."""
    with _transaction(conn, path):
        current = conn.execute("PRAGMA user_version").fetchall()[0][0]   # another may have won
        for step in range(current, SCHEMA_VERSION):
            if step not in MIGRATIONS:
                raise DatabaseUnusable(f"{path} has schema version {step}, which this "
                                       f"litequeue cannot migrate")
            conn.execute(MIGRATIONS[step])
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def open_database(path, *, durable=True, busy_timeout_s=DEFAULT_BUSY_TIMEOUT_S, create=True,
                  checked=False):
    """An apsw connection to a checked litequeue file, created (0600) if missing.
    checked=True: the caller (a job's child) knows the file was checked moments ago."""
    path = os.fspath(path)
    if checked:
        conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE)
        return _configure(conn, path, durable, busy_timeout_s)
    if os.path.isdir(path):
        raise DatabaseUnusable(f"{path} is a directory, not a database file")
    if not os.path.exists(path):
        if not create:
            raise DatabaseUnusable(f"no database at {path} (check --db / $LITEQUEUE_DB)")
        _create_database(path)
    try:
        # READWRITE without CREATE: a file deleted under us is an error, never a new empty file.
        conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE)
    except apsw.Error as exc:
        raise _translate(exc, path) from None
    try:
        # Until the file is known to be ours, closing must not checkpoint a WAL someone left
        # into it: another program's commits stay where that program left them.
        conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, int(os.path.exists(path + "-wal")))
        conn.set_busy_timeout(int(busy_timeout_s * 1000))
        _check_identity(conn, path)
        if conn.execute("PRAGMA journal_mode").fetchall()[0][0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 0)
    except BaseException as exc:
        conn.close()                  # refused or failed: leave nothing open on the file
        if isinstance(exc, apsw.Error):
            raise _translate(exc, path) from None
        raise
    return _configure(conn, path, durable, busy_timeout_s)


# SQLite's own busy handler's sleeps (sqliteDefaultBusyCallback), in seconds.
_BUSY_SLEEPS_S = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.025, 0.025, 0.05, 0.05, 0.1)


def interruptible_busy_handler(timeout_s, clock=time.monotonic):
    """A busy handler for apsw's set_busy_handler() that waits like SQLite's own, but sleeps
    in Python: SQLite's sleeps in C, where a Ctrl-C only lands once the whole busy timeout
    is over (10 s). A KeyboardInterrupt raised in its sleep ends the statement with it."""
    started = []

    def handler(count):
        if count == 0:
            started[:] = [clock()]
        left = timeout_s - (clock() - started[0]) if started else timeout_s
        if left <= 0:
            return False
        time.sleep(min(_BUSY_SLEEPS_S[min(count, len(_BUSY_SLEEPS_S) - 1)], left))
        return True
    return handler


def _configure(conn, path, durable, busy_timeout_s):
    """The busy timeout and the per-connection pragmas."""
    # SQLite's own busy wait (sleeps of 1, 2, 5, 10... ms) was measured against tries every
    # 0.1-0.2 ms: no faster with children that commit at once, and slower end to end with
    # pooled children (a waiter that tries sooner only breaks up the holder's run of commits).
    conn.set_busy_timeout(int(busy_timeout_s * 1000))
    try:
        # FULL: a commit that returned survives power loss. NORMAL: survives any process
        # crash, and the last commits may roll back on power loss; no fsync per commit.
        conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        # Keep the WAL from staying large after a burst once it has been checkpointed.
        conn.execute("PRAGMA journal_size_limit = 4194304")
        return conn
    except apsw.Error as exc:
        conn.close()
        raise _translate(exc, path) from None


_ENVIRONMENT_ERRORS = (apsw.BusyError, apsw.LockedError, apsw.FullError, apsw.ReadOnlyError,
                       apsw.IOError, apsw.CorruptError, apsw.NotADBError, apsw.CantOpenError,
                       apsw.PermissionsError)


@contextlib.contextmanager
def _transaction(conn, path):
    """BEGIN IMMEDIATE ... COMMIT: takes the write lock up front, so a busy file waits in the
    busy handler instead of failing mid-transaction with 'database is locked'."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except apsw.Error as exc:
        raise _translate(exc, path) from None
    try:
        yield conn
    except _ENVIRONMENT_ERRORS as exc:     # the file, not the caller: read-only, full, locked
        with contextlib.suppress(apsw.Error):
            conn.execute("ROLLBACK")
        raise _translate(exc, path) from None
    except BaseException:
        with contextlib.suppress(apsw.Error):
            conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except apsw.Error as exc:
        with contextlib.suppress(apsw.Error):
            conn.execute("ROLLBACK")
        raise _translate(exc, path) from None


def _rows(cursor):
    """A cursor's rows as dicts, read to the end so no read transaction stays open."""
    names = None
    out = []
    for row in cursor:
        if names is None:
            names = [d[0] for d in cursor.get_description()]
        out.append(dict(zip(names, row)))
    return out


class _DirectoryWatch:
    """inotify on the database's directory (Linux): readable whenever a process writes the
    WAL, so an idle supervisor notices new work, and a producer waiting on a full queue
    notices room, at once without polling the file 100 times a second. open() returns None
    where inotify is unavailable."""

    IN_MODIFY, IN_CREATE, IN_NONBLOCK, IN_CLOEXEC = 0x2, 0x100, 0o4000, 0o2000000

    def __init__(self, fd):
        self.fd = fd

    @classmethod
    def open(cls, path, libc):
        try:
            fd = libc.inotify_init1(cls.IN_NONBLOCK | cls.IN_CLOEXEC)
            if fd < 0:
                return None
            directory = os.fsencode(os.path.dirname(os.path.abspath(path)))
            if libc.inotify_add_watch(fd, directory, cls.IN_MODIFY | cls.IN_CREATE) < 0:
                os.close(fd)
                return None
            return cls(fd)
        except (AttributeError, OSError):
            return None

    def drain(self):
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(self.fd, 65536):
                pass

    def close(self):
        os.close(self.fd)


# ======================================================================================
# Jobs, tasks and the task context
# ======================================================================================

class Job:
    """A snapshot of one job row. Field names are the column names; JSON columns decoded,
    and `priority` given by name."""

    __slots__ = ("id", "task", "payload", "priority", "state", "unique_key", "attempts",
                 "max_attempts", "timeout_s", "memory_limit_bytes", "shed", "created_at",
                 "due_at", "expires_at", "started_at", "finished_at", "owner", "pid",
                 "cancel_requested", "preemptions", "recoveries", "result", "error",
                 "checkpoint", "checkpoint_at", "progress_done", "progress_total", "overrides")

    def __init__(self, row, strict=False):
        """strict: a JSON column that does not parse raises UnreadableValue (a job about to
        run); otherwise it is kept as the text stored, so it can still be shown and fixed."""
        for name in self.__slots__:
            setattr(self, name, row.get(name))
        for name in ("payload", "result", "checkpoint"):
            try:
                setattr(self, name, _stored_json(row.get(name), name))
            except UnreadableValue:
                if strict:
                    raise
                raw = row.get(name)
                setattr(self, name, raw if isinstance(raw, str) else repr(raw))
        self.priority = PRIORITY_NAMES[row["priority"]]
        self.shed = bool(row.get("shed"))
        self.cancel_requested = bool(row.get("cancel_requested"))

    @property
    def priority_value(self):
        return PRIORITIES[self.priority]

    def to_dict(self):
        return {name: getattr(self, name) for name in self.__slots__}

    to_fields = to_dict

    @classmethod
    def from_fields(cls, fields):
        """The Job whose to_fields() gave `fields` (as a child receives it over its pipe)."""
        job = cls.__new__(cls)
        for name in cls.__slots__:
            setattr(job, name, fields.get(name))
        return job

    def __repr__(self):
        return f"<Job {self.id} {self.task} {self.state} attempts={self.attempts}>"


class TaskDefaults:
    """A task's declared defaults, as stored in the catalogue."""

    __slots__ = ("name", "priority", "max_attempts", "timeout_s", "memory_limit_bytes",
                 "ttl_s", "shed", "unique_task", "breaker_failures", "breaker_window_s")

    def __init__(self, name, priority=NORMAL, max_attempts=DEFAULT_MAX_ATTEMPTS, timeout_s=None,
                 memory_limit_bytes=None, ttl_s=None, shed=False, unique_task=False,
                 breaker_failures=None, breaker_window_s=None):
        self.name = check_name(name)
        self.priority = parse_priority(priority)
        self.max_attempts = parse_positive_int(max_attempts, "max_attempts")
        self.timeout_s = None if timeout_s is None else parse_duration(timeout_s, "timeout",
                                                                       allow_zero=False)
        self.memory_limit_bytes = (None if memory_limit_bytes is None
                                   else parse_size(memory_limit_bytes, "memory_limit"))
        self.ttl_s = None if ttl_s is None else parse_duration(ttl_s, "ttl", allow_zero=False)
        self.shed = bool(shed)
        self.unique_task = bool(unique_task)
        # This task's own breaker thresholds; None: the supervisor's (--breaker-*).
        self.breaker_failures = (None if breaker_failures is None
                                 else parse_positive_int(breaker_failures, "breaker_failures"))
        self.breaker_window_s = (None if breaker_window_s is None
                                 else parse_duration(breaker_window_s, "breaker_window",
                                                     allow_zero=False))

    def as_row(self):
        return {name: getattr(self, name) for name in self.__slots__}

    def __eq__(self, other):
        return isinstance(other, TaskDefaults) and self.as_row() == other.as_row()


_CATALOGUE_COLUMNS = ", ".join(TaskDefaults.__slots__)


def _store_catalogue_row(conn, defaults, at):
    names = TaskDefaults.__slots__
    conn.execute(
        f"INSERT INTO tasks ({_CATALOGUE_COLUMNS}, updated_at)"
        f" VALUES ({', '.join(':' + n for n in names)}, :at) ON CONFLICT (name) DO UPDATE SET"
        f" {', '.join(f'{n} = excluded.{n}' for n in names[1:])}, updated_at = excluded.updated_at",
        {**defaults.as_row(), "at": at})


class Task:
    """A registered task: the function plus its defaults. Call it to run it directly."""

    def __init__(self, queue, fn, defaults):
        self.queue, self.fn, self.defaults = queue, fn, defaults
        self.name = defaults.name
        self.__doc__ = getattr(fn, "__doc__", None)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def enqueue(self, **payload):
        """Enqueue with keyword arguments as the payload and the declared defaults."""
        return self.queue.enqueue(self.name, payload or None)

    def enqueue_with(self, payload=None, **options):
        """Enqueue with per-job options (priority, unique, delay, ttl, ...)."""
        return self.queue.enqueue(self.name, payload, **options)

    def __repr__(self):
        return f"<Task {self.name}>"


class Context:
    """What a running task sees: its job, last checkpoint, and the way to save progress.

    In a supervisor's child, checkpoints and progress go to the supervisor over a pipe;
    Context(queue, job, owner) writes them to the queue itself (a task run by hand, a test)."""

    def __init__(self, queue, job, owner, *, reporter=None):
        self.job = job
        self.job_id = job.id
        self.payload = job.payload
        self.attempt = job.attempts
        self.checkpoint = job.checkpoint
        self._reporter = reporter or _QueueReporter(queue, owner)
        self._stop_asked = False
        self._progress_sent_tick = -PROGRESS_EVERY_S

    @property
    def stopping(self):
        """True once a stop (preemption, shutdown, cancel) was asked: reach save() soon."""
        return self._stop_asked

    def ask_stop(self):
        self._stop_asked = True

    def save(self, state):
        """Store state durably as the job's checkpoint. If a stop was asked, does not return:
        the job ends here and later resumes from this state."""
        _flush_stdout()          # the output up to a checkpoint is on disk with it
        self._reporter.save(self.job, dumps_json(state, "checkpoint"))
        self.checkpoint = state
        if self._stop_asked:
            raise StopRequested()

    def emit(self, data):
        """Append `data` (str, written as UTF-8, or bytes) to the job's output and flush: in a
        child, fd 1 is the job's output file; nothing is kept back beyond this one write."""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        elif not isinstance(data, (bytes, bytearray, memoryview)):
            raise BadInput(f"ctx.emit takes str or bytes, not {type(data).__name__}")
        _flush_stdout()                  # whatever print() left buffered goes first
        _write_all(1, data)

    def progress(self, done, total=None):
        """Report progress for `status` (sent at most every PROGRESS_EVERY_S, and the last)."""
        done, total = float(done), None if total is None else float(total)
        tick = time.monotonic()
        if tick - self._progress_sent_tick >= PROGRESS_EVERY_S or (
                total is not None and done >= total):
            self._progress_sent_tick = tick
            _flush_stdout()      # a follower sees the output as far as the progress says
            self._reporter.progress(self.job, done, total)


def _flush_stdout():
    try:                                 # (no context manager: emit is called per line)
        sys.stdout.flush()
    except Exception:
        pass


def _write_all(fd, data):
    if type(data) is bytes:              # the usual case: one write, no memoryview
        written = os.write(fd, data)
        if written == len(data):
            return
        data = data[written:]
    view = memoryview(data).cast("B")
    while view:                          # a short write (a signal arrived): the rest
        view = view[os.write(fd, view):]


class _QueueReporter:
    """Where a task's checkpoints and progress go when it runs outside a child: the queue."""

    def __init__(self, queue, owner):
        self.queue, self.owner = queue, owner

    def save(self, job, text):
        self.queue.save_checkpoint(job.id, self.owner, job.attempts, json.loads(text))

    def progress(self, job, done, total):
        self.queue.set_progress(job.id, self.owner, job.attempts, done, total)


class _Lease:
    __slots__ = ("task", "attempts", "max_attempts", "cancel_requested")

    def __init__(self, task, attempts, max_attempts, cancel_requested):
        self.task, self.attempts, self.max_attempts = task, attempts, max_attempts
        self.cancel_requested = bool(cancel_requested)


class RunRecord:
    """What a supervisor commits for one run: its newest progress and checkpoint, and its
    Ending once decided; the pressure goes with a requeue's event."""

    __slots__ = ("job_id", "attempt", "progress", "checkpoint", "ending", "pressure")

    def __init__(self, job_id, attempt, progress=None, checkpoint=None, ending=None,
                 pressure=None):
        self.job_id, self.attempt, self.progress = job_id, attempt, progress
        self.checkpoint, self.ending, self.pressure = checkpoint, ending, pressure


def backoff_s(attempts, base_s=BACKOFF_BASE_S, cap_s=BACKOFF_CAP_S, rand=random.random):
    """Delay before retry number `attempts`: doubling from base, capped, with +-20% jitter so
    that jobs failing together do not retry together."""
    delay = min(cap_s, base_s * 2.0 ** min(max(0, attempts - 1), 64))
    return min(cap_s, delay * (0.8 + 0.4 * rand()))


# ======================================================================================
# Queue: the public API
# ======================================================================================

# A waiting job whose TTL ran out by :at: the sweep skips it, and reads count it skipped.
_EXPIRED = "expires_at IS NOT NULL AND expires_at <= :at"


class _Store:
    """A litequeue file's connection and what every part of the API writes with: one
    transaction helper (BEGIN IMMEDIATE), reads read to the end, events.

    An apsw connection serves one thread at a time, and a Queue serves any number (a
    threaded web server, a thread pool): every use of the connection, a transaction or a
    read fetched to its last row, holds self._lock. It is reentrant, so a transaction may
    read, and a method may hold it across steps that must not be split (see _unsynced)."""

    @contextlib.contextmanager
    def _using(self):
        """Hold the connection for several steps that must not be split."""
        with self._lock:
            self._check_open()
            yield self.conn

    def _check_open(self):
        if self._closed:
            raise QueueClosed(f"the Queue on {self.path} was closed; open a new one")

    # _tx and _read take the lock themselves rather than through _using: one generator
    # less per call. Measured on single-thread NORMAL enqueues: 6-10 % slower than without
    # a lock through _using, 4 % this way (29,000/s against 30,100/s).
    @contextlib.contextmanager
    def _tx(self):
        with self._lock:
            self._check_open()
            with _transaction(self.conn, self.path) as conn:
                yield conn

    def _read(self, sql, params=()):
        with self._lock:
            self._check_open()
            try:
                return _rows(self.conn.execute(sql, params))
            except apsw.Error as exc:
                raise _translate(exc, self.path) from None

    def _event(self, at, job_id, task, kind, from_state, to_state, reason=None, pressure=None):
        _insert_event(self.conn, at, job_id, task, kind, from_state, to_state, reason, pressure)

    @contextlib.contextmanager
    def _unsynced(self):
        """Commit what runs inside without an fsync. The lock is held from the lowering to
        the restoring: another thread's enqueue in between would lose its durability."""
        with self._using():
            if not self.durable:
                yield
                return
            self.conn.execute("PRAGMA synchronous = NORMAL")
            try:
                yield
            finally:
                self.conn.execute("PRAGMA synchronous = FULL")

    def _finish(self, job_id, task, from_state, to_state, at, reason, error=None):
        """Move a job to a final state (inside a transaction) and record it."""
        self.conn.execute(
            "UPDATE jobs SET state = ?, finished_at = ?, owner = NULL, pid = NULL,"
            " error = coalesce(?, error) WHERE id = ?", (to_state, at, error or reason, job_id))
        self._event(at, job_id, task, "job", from_state, to_state, reason)

    def data_version(self):
        """Changes whenever another connection commits to the file (PRAGMA data_version)."""
        return self._read("PRAGMA data_version")[0]["data_version"]


class _Leases(_Store):
    """The worker side of a queue, as a supervisor uses it: claims (each a lease on a job),
    what becomes of a leased job (done, failed, requeued, cancelled), checkpoints and
    progress, the group commit of a supervisor's reports, and the supervisors' own rows.
    Every method that writes checks the lease (owner and attempt) in the same statement."""

    # -- the worker side: claim, complete, fail, release, checkpoints --------------------

    def claim(self, owner, *, tasks=None, priorities=(0, 1, 2, 3), limit=1, at=None,
              age_s=None):
        """Atomically take up to `limit` due jobs (priority, then due time, then id) for
        `owner`, skipping tasks behind an open breaker. Each claim charges one attempt.
        `tasks`: the names of the tasks the claimer serves (None: any); a dict {name: Task}
        also gives its declarations, which come before the catalogue when a job's options
        resolve (see RESOLVED_AT_CLAIM). `priorities`: the jobs' own priorities that may be
        claimed. `age_s`: the priority a job is claimed at improves by one for each `age_s`
        it has waited past its due time, up to high (see aged_priority); None or 0: no aging.

        A claim is committed without its own fsync, even on a durable queue: it records only
        a lease. Should power fail before a later commit syncs the log, the job is found
        queued again, which is what recovery makes of a running job whose supervisor died."""
        at = now() if at is None else at
        with self._unsynced(), self._tx():
            return self._claim_in_tx(owner, tasks, priorities, limit, at, age_s=age_s)

    def complete_and_claim(self, job_id, owner, attempt, result=None, *, tasks=None,
                           priorities=(0, 1, 2, 3), pid=None, age_s=None):
        """complete(), and in the same transaction claim the next job for the same owner:
        one commit between two jobs, as a pooled child goes on. The claimed row records
        `pid`, the process that will run it. Returns the Job or None."""
        text = dumps_json(result, "result")
        with self._tx():
            at = now()
            self._complete_in_tx(job_id, owner, attempt, text, at)
            claimed = self._claim_in_tx(owner, tasks, priorities, 1, at, pid, age_s)
        return claimed[0] if claimed else None

    def _claim_in_tx(self, owner, tasks, priorities, limit, at, pid=None, age_s=None):
        served = None if tasks is None else tuple(sorted(set(tasks)))
        claimed = []
        levels = self._claim_levels(priorities, at, age_s)
        if not levels:
            return []
        blocked, trial_tasks = breakers_blocking(self.conn, at)
        for level, sources in levels:
            heads = {}
            while len(claimed) < limit:
                row = self._next_of_level(sources, heads, at, served, blocked)
                if row is None:
                    break
                task = tasks.get(row["task"]) if isinstance(tasks, dict) else None
                (running,) = _rows(self.conn.execute(self._CLAIM_SQL, {
                    "owner": owner, "at": at, "pid": pid, "id": row["id"],
                    "declared": task is not None,
                    **{name: None if task is None else getattr(task.defaults, name)
                       for name in self.RESOLVED_AT_CLAIM}}))
                self._event(at, row["id"], row["task"], "job", QUEUED, RUNNING,
                            owner if running["priority"] == level else
                            f"{owner} (aged: {PRIORITY_NAMES[running['priority']]} started as "
                            f"{PRIORITY_NAMES[level]})")
                try:
                    job = Job(running, strict=True)
                except UnreadableValue as exc:        # it can never run: dead, not a crash
                    self._finish(row["id"], row["task"], RUNNING, DEAD, at, str(exc))
                    continue
                if row["task"] in trial_tasks:
                    begin_trial(self.conn, row["task"], row["id"], at)
                    blocked.add(row["task"])           # exactly one trial job
                    heads.clear()                      # one of them may be of that task
                claimed.append(job)
        return claimed

    # The best priority with anything queued, read off the claim index: the probes skip
    # the (often empty) levels above it. With aging, in the same statement, the oldest due
    # time of each priority that can age: a lower priority is looked at early only when
    # its oldest job has waited long enough.
    _LOWEST_SQL = ("SELECT (SELECT min(priority) FROM jobs INDEXED BY jobs_claim"
                   " WHERE state = 'queued')")
    _LOWEST_AND_OLDEST_SQL = _LOWEST_SQL + "".join(
        ", (SELECT min(due_at) FROM jobs INDEXED BY jobs_claim"
        f" WHERE state = 'queued' AND priority = {priority})" for priority in (NORMAL, LOW))

    def _claim_levels(self, priorities, at, age_s):
        """The order a claim looks in: for each priority a job may be claimed at, best
        first, (that priority, its sources as (own priority, due by)): the jobs of that
        priority due by now, and, with aging, those of a lower one that have waited long
        enough to be claimed at this one. [] when nothing is queued."""
        if age_s is not None and not age_s >= 0:
            raise BadInput(f"age_s: {age_s!r} must be >= 0")
        best = {}        # {own priority: the best any job of it is claimed at now}, if aged
        if not age_s:
            (lowest,) = self.conn.execute(self._LOWEST_SQL).fetchall()[0]
        else:
            lowest, *oldest = self.conn.execute(self._LOWEST_AND_OLDEST_SQL).fetchall()[0]
            for priority, due_at in zip((NORMAL, LOW), oldest):
                aged = priority if due_at is None else aged_priority(priority, at - due_at, age_s)
                if aged < priority:
                    best[priority] = aged
        if lowest is None:
            return []
        own = sorted(p for p in priorities if p >= lowest)
        if not best.keys() & own:                  # nothing aged: one source per priority
            return [(p, [(p, at)]) for p in own]
        levels = [(level, [(p, at - (p - level) * age_s if p > level else at)
                           for p in own if p == level or best.get(p, p) <= level < p])
                  for level in PRIORITY_NAMES]
        return [(level, sources) for level, sources in levels if sources]

    def _next_of_level(self, sources, heads, at, served, blocked):
        """The next job of one claim priority: the earliest (due time, then id) of its
        sources' next jobs, each the oldest of its source, so a merge with no scan.
        `heads` keeps the others' for the next call in the same claim."""
        if len(sources) == 1:                      # no aging here: nothing to merge
            priority, due_by = sources[0]
            return self._next_due(priority, at, served, blocked, due_by)
        for priority, due_by in sources:
            if priority not in heads:
                heads[priority] = self._next_due(priority, at, served, blocked, due_by)
        ready = [(row["due_at"], row["id"], priority)
                 for priority, row in heads.items() if row is not None]
        return heads.pop(min(ready)[2]) if ready else None

    # Options a job may set for itself, and their bits in jobs.overrides. Those it did not
    # set resolve in the UPDATE that claims it (claims are hot: one statement, no reads):
    # from the claimer's declaration of the task, else the catalogue row, else the global
    # defaults (DEFAULT_MAX_ATTEMPTS; no timeout; the supervisor's memory limit).
    RESOLVED_AT_CLAIM = {"max_attempts": 1, "timeout_s": 2, "memory_limit_bytes": 4}
    _CLAIM_SQL = (
        "UPDATE jobs SET state = 'running', owner = :owner, started_at = :at,"
        " attempts = attempts + 1, pid = :pid,"
        " max_attempts = CASE WHEN overrides & 1 THEN max_attempts"
        " WHEN :declared THEN :max_attempts ELSE coalesce((SELECT t.max_attempts FROM tasks t"
        f" WHERE t.name = jobs.task), {DEFAULT_MAX_ATTEMPTS}) END,"
        " timeout_s = CASE WHEN overrides & 2 THEN timeout_s"
        " WHEN :declared THEN :timeout_s ELSE (SELECT t.timeout_s FROM tasks t"
        " WHERE t.name = jobs.task) END,"
        " memory_limit_bytes = CASE WHEN overrides & 4 THEN memory_limit_bytes"
        " WHEN :declared THEN :memory_limit_bytes ELSE (SELECT t.memory_limit_bytes"
        " FROM tasks t WHERE t.name = jobs.task) END"
        " WHERE id = :id RETURNING *")

    CLAIM_WINDOW = 64

    def _next_due(self, priority, at, served, blocked, due_by=None):
        """The next claimable job at one priority, due by `due_by` (default: `at`) and not
        expired at `at`: {id, task, due_at}, or None.

        Jobs are looked at in claim order (due time, then id) among the first CLAIM_WINDOW
        due at this priority, which is where the next job almost always is. Only when all
        of those belong to tasks this claimer may not run (served by another supervisor,
        or behind an open breaker) does it seek the earliest job of each task it may run,
        so a backlog of someone else's jobs never makes every claim scan it."""
        window = ("SELECT id, task, due_at, expires_at FROM jobs INDEXED BY jobs_claim"
                  " WHERE state = 'queued' AND priority = :priority AND due_at <= :due_by"
                  " ORDER BY due_at, id LIMIT :window")
        params = {"priority": priority, "at": at, "window": self.CLAIM_WINDOW,
                  "due_by": at if due_by is None else due_by}
        claimable = " (expires_at IS NULL OR expires_at > :at)"
        # The task lists as literal parameter lists: a few times cheaper than json_each,
        # and each supervisor keeps using the same few statements (cached once prepared).
        for name, op, values in (("b", "NOT IN", sorted(blocked)), ("s", "IN", served)):
            if values is not None and (values or op == "IN"):
                marks = ", ".join(f":{name}{i}" for i in range(len(values)))
                claimable += f" AND task {op} ({marks})"
                params.update((f"{name}{i}", value) for i, value in enumerate(values))
        rows = _rows(self.conn.execute(
            f"SELECT id, task, due_at FROM ({window}) WHERE{claimable} LIMIT 1", params))
        if rows:
            return rows[0]
        crowded = self.conn.execute(f"SELECT count(*) FROM ({window})",
                                    params).fetchall()[0][0] == self.CLAIM_WINDOW
        if not crowded:
            return None
        if served is None:                    # no list of tasks to seek: scan in claim order
            rows = _rows(self.conn.execute(
                "SELECT id, task, due_at FROM jobs INDEXED BY jobs_claim WHERE state = 'queued'"
                f" AND priority = :priority AND due_at <= :due_by AND{claimable}"
                " ORDER BY due_at, id LIMIT 1", params))
            return rows[0] if rows else None
        best = None
        for task in served:
            if task in blocked:
                continue
            rows = _rows(self.conn.execute(
                "SELECT id, task, due_at FROM jobs INDEXED BY jobs_task_queue"
                " WHERE state = 'queued' AND task = :task AND priority = :priority"
                " AND due_at <= :due_by AND (expires_at IS NULL OR expires_at > :at)"
                " ORDER BY due_at, id LIMIT 1", {**params, "task": task}))
            if rows and (best is None or (rows[0]["due_at"], rows[0]["id"])
                         < (best["due_at"], best["id"])):
                best = rows[0]
        return best

    def has_due(self, *, tasks=None, at=None):
        """Is any job of these tasks claimable now (ignoring memory pressure)?"""
        at = now() if at is None else at
        served = None if tasks is None else tuple(sorted(set(tasks)))
        with self._using():
            try:
                blocked, _ = breakers_blocking(self.conn, at)
                return any(self._next_due(p, at, served, blocked) is not None
                           for p in PRIORITY_NAMES)
            except apsw.Error as exc:
                raise _translate(exc, self.path) from None

    def _leased(self, job_id, owner, attempt):
        """The lease row (task, attempts, max_attempts, cancel_requested) of a job running
        under this lease; LeaseLost if there is none."""
        rows = self.conn.execute(
            "SELECT task, attempts, max_attempts, cancel_requested FROM jobs WHERE id = ?"
            " AND state = 'running' AND owner = ? AND attempts = ?",
            (job_id, owner, attempt)).fetchall()
        if not rows:
            raise LeaseLost(f"job {job_id} is no longer running under lease {owner}/{attempt}")
        return _Lease(*rows[0])

    def complete(self, job_id, owner, attempt, result=None):
        """Mark a leased job done with its JSON result."""
        text = dumps_json(result, "result")
        with self._tx():
            self._complete_in_tx(job_id, owner, attempt, text, now())

    def _complete_in_tx(self, job_id, owner, attempt, text, at):
        # The lease check and the update in one statement.
        rows = self.conn.execute(
            "UPDATE jobs SET state = 'done', result = ?, finished_at = ?, owner = NULL,"
            " pid = NULL, error = NULL WHERE id = ? AND state = 'running' AND owner = ?"
            " AND attempts = ? RETURNING task,"
            " (SELECT state FROM breakers WHERE breakers.task = jobs.task)",
            (text, at, job_id, owner, attempt)).fetchall()
        if not rows:
            raise LeaseLost(f"job {job_id} is no longer running under lease {owner}/{attempt}")
        task, breaker_state = rows[0]
        self._event(at, job_id, task, "job", RUNNING, DONE, None)
        if breaker_state not in (None, "closed"):        # only a trial can close one
            breaker_success(self.conn, task, job_id, at)
        if task == "heartbeat":
            self.conn.execute("INSERT INTO meta (key, value) VALUES ('heartbeat_at', ?)"
                              " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                              (repr(at),))

    def fail(self, job_id, owner, attempt, error, *, retryable=True, breaker_failure=True):
        """Record a failure of a leased job: retry later with backoff while attempts remain,
        else dead with the error kept. Returns the new state."""
        with self._tx():
            return self._fail_in_tx(job_id, owner, attempt, error, retryable, breaker_failure,
                                    now())

    def _fail_in_tx(self, job_id, owner, attempt, error, retryable, breaker_failure, at):
        job = self._leased(job_id, owner, attempt)
        if job.cancel_requested:
            # Asked to cancel: no retry, and however the task ended (an exception from
            # being interrupted, a kill) it says nothing of the task's health.
            breaker_release_trial(self.conn, job.task, job_id, at)
            self._finish(job_id, job.task, RUNNING, CANCELLED, at, "cancelled", error=error)
            return CANCELLED
        if breaker_failure:
            breaker_failed(self.conn, self.breaker_policy, job.task, job_id, at)
        else:
            breaker_release_trial(self.conn, job.task, job_id, at)
        if retryable and job.attempts < job.max_attempts:
            # The TTL counts from when the job is due: a backoff moves its expiry along
            # with its due time (so expires_at - due_at stays the TTL, which retry uses).
            self.conn.execute(
                "UPDATE jobs SET state = 'queued', error = :error, expires_at = expires_at"
                " + (:due_at - due_at), due_at = :due_at, owner = NULL, pid = NULL"
                " WHERE id = :id", {"error": error, "due_at": at + backoff_s(job.attempts),
                                    "id": job_id})
            self._event(at, job_id, job.task, "job", RUNNING, QUEUED,
                        f"attempt {job.attempts} failed: {_last_line(error)}")
            return QUEUED
        self._finish(job_id, job.task, RUNNING, DEAD, at, _last_line(error), error=error)
        return DEAD

    def requeue(self, job_id, owner, attempt, reason, *, charge, preempted=False,
                recovered=False, pressure=None):
        """Give a running job back to the queue with its checkpoint (preemption, shutdown).
        Not charged: the attempt is refunded. Charged and out of attempts: dead."""
        with self._tx():
            return self._requeue(job_id, owner, attempt, reason, charge, preempted, recovered,
                                 pressure, now())

    def _requeue(self, job_id, owner, attempt, reason, charge, preempted, recovered, pressure,
                 at):
        job = self._leased(job_id, owner, attempt)
        breaker_release_trial(self.conn, job.task, job_id, at)
        if job.cancel_requested:                 # asked to cancel: it ends here
            self._finish(job_id, job.task, RUNNING, CANCELLED, at, "cancelled")
            return CANCELLED
        if charge and job.attempts >= job.max_attempts:
            self._finish(job_id, job.task, RUNNING, DEAD, at, reason)
            return DEAD
        self.conn.execute(
            "UPDATE jobs SET state = 'queued', owner = NULL, pid = NULL,"
            " attempts = attempts - ?, preemptions = preemptions + ?,"
            " recoveries = recoveries + ? WHERE id = ?",
            (0 if charge else 1, int(preempted), int(recovered), job_id))
        self._event(at, job_id, job.task, "job", RUNNING, QUEUED, reason, pressure)
        return QUEUED

    def finish_cancelled(self, job_id, owner, attempt):
        """A running job whose cancel was asked has stopped: cancelled."""
        with self._tx():
            self._finish_cancelled_in_tx(job_id, owner, attempt, now())

    def _finish_cancelled_in_tx(self, job_id, owner, attempt, at):
        job = self._leased(job_id, owner, attempt)
        breaker_release_trial(self.conn, job.task, job_id, at)
        self._finish(job_id, job.task, RUNNING, CANCELLED, at, "cancelled")

    def save_checkpoint(self, job_id, owner, attempt, state):
        """Store a running job's checkpoint durably."""
        text = dumps_json(state, "checkpoint")
        with self._tx():
            self._save_checkpoint_in_tx(job_id, owner, attempt, text, now())

    def _save_checkpoint_in_tx(self, job_id, owner, attempt, text, at):
        self.conn.execute(
            "UPDATE jobs SET checkpoint = ?, checkpoint_at = ? WHERE id = ?"
            " AND state = 'running' AND owner = ? AND attempts = ?",
            (text, at, job_id, owner, attempt))
        if not self.conn.changes():
            raise LeaseLost(f"job {job_id} is no longer running under lease {owner}/{attempt}")

    def load_checkpoint(self, job_id):
        return self.get(job_id).checkpoint

    def set_progress(self, job_id, owner, attempt, done, total=None):
        with self._tx():
            self.conn.execute(
                "UPDATE jobs SET progress_done = ?, progress_total = ? WHERE id = ?"
                " AND state = 'running' AND owner = ? AND attempts = ?",
                (done, total, job_id, owner, attempt))

    def record_runs(self, owner, records, *, events=(), claims=(), samples=(), at=None):
        """Record in one transaction what a supervisor's children reported (progress,
        checkpoints) and how their runs ended, the supervisor's decisions (events), its
        memory samples ((at, pressure, level, tree_bytes) each; samples older than
        PRESSURE_HISTORY_S go), and claim its next jobs (claims: (tasks, priorities, limit,
        age_s) each, as claim() takes them): a group commit.

        Returns ({job_id: state after, or None if its lease was lost}, [[claimed Job] for
        each claim]). Synced
        (on a durable queue) when it holds a checkpoint or an ending: a child hears that its
        checkpoint is saved only once this has returned."""
        at = now() if at is None else at
        synced = any(r.checkpoint is not None or r.ending is not None for r in records)
        states = {}
        with (contextlib.nullcontext() if synced else self._unsynced()), self._tx():
            for record in records:
                try:
                    states[record.job_id] = self._record_run(owner, record, at)
                except LeaseLost:
                    states[record.job_id] = None
            for kind, job_id, task, from_state, to_state, reason, pressure, event_at in events:
                self._event(event_at, job_id, task, kind, from_state, to_state, reason, pressure)
            if samples:
                self._record_samples(owner, samples)
            claimed = [self._claim_in_tx(owner, tasks, priorities, limit, at, age_s=age_s)
                       for tasks, priorities, limit, age_s in claims]
        return states, claimed

    def _record_samples(self, owner, samples):
        self.conn.executemany(
            "INSERT INTO pressure_samples (at, supervisor, pressure, level, tree_bytes)"
            " VALUES (?, ?, ?, ?, ?)", [(at, owner, pressure, level, tree_bytes)
                                        for at, pressure, level, tree_bytes in samples])
        # An index seek that finds nothing most times: cheaper than a separate sweep.
        self.conn.execute("DELETE FROM pressure_samples WHERE at < ?",
                          (max(sample[0] for sample in samples) - PRESSURE_HISTORY_S,))

    def _record_run(self, owner, record, at):
        lease = (record.job_id, owner, record.attempt)
        if record.progress is not None:
            self.conn.execute(
                "UPDATE jobs SET progress_done = ?, progress_total = ? WHERE id = ?"
                " AND state = 'running' AND owner = ? AND attempts = ?", (*record.progress, *lease))
        if record.checkpoint is not None:
            self._save_checkpoint_in_tx(*lease, record.checkpoint, at)
        ending = record.ending
        if ending is None:
            return RUNNING
        if ending.state == DONE:
            self._complete_in_tx(*lease, ending.result, at)
            return DONE
        if ending.state == CANCELLED:
            self._finish_cancelled_in_tx(*lease, at)
            return CANCELLED
        if ending.state == ENDING_FAILED:
            return self._fail_in_tx(*lease, ending.reason, ending.retryable,
                                    ending.breaker_failure, at)
        return self._requeue(*lease, ending.reason, ending.charge, ending.preempted, False,
                             record.pressure, at)

    def cancel_requested(self, job_ids):
        """Which of these jobs someone asked to cancel."""
        marks = ",".join("?" * len(job_ids))
        return [row["id"] for row in self._read(
            f"SELECT id FROM jobs WHERE cancel_requested = 1 AND id IN ({marks})", job_ids)]

    # -- supervisors: registration, leases, recovery --------------------------------------

    def register_supervisor(self, supervisor_id, host, task_names, task_defaults,
                            isolation=None):
        """Store a supervisor's task declarations and its row (its lease on its jobs)."""
        self.store_catalogue(task_defaults)
        import psutil
        started_at = psutil.Process().create_time()
        with self._tx():
            self.conn.execute(
                "INSERT OR REPLACE INTO supervisors (id, host, pid, started_at, heartbeat_at,"
                " tasks, isolation) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (supervisor_id, host, os.getpid(), started_at, now(), json.dumps(task_names),
                 isolation))

    def unregister_supervisor(self, supervisor_id):
        with contextlib.suppress(Error):
            with self._tx():
                self.conn.execute("DELETE FROM supervisors WHERE id = ?", (supervisor_id,))

    def supervisor_heartbeat(self, supervisor_id, at, level, pressure, running):
        """Renew a supervisor's lease; False if its row is gone (it was taken for dead)."""
        with self._unsynced(), self._tx():
            self.conn.execute(
                "UPDATE supervisors SET heartbeat_at = ?, level = ?, pressure = ?, running = ?"
                " WHERE id = ?", (at, level, pressure, json.dumps(running), supervisor_id))
            return bool(self.conn.changes())

    def recover_orphans(self, owner, is_alive, at):
        """Requeue jobs whose supervisor is gone (is_alive(row, at) says). Recoveries are
        charged, so a job that keeps killing its supervisor ends dead instead of looping.
        One transaction: no supervisor can register and claim between the look at who is
        alive and the requeue."""
        recovered = []
        with self._tx():
            rows = _rows(self.conn.execute("SELECT * FROM supervisors"))
            dead = {sup["id"] for sup in rows if sup["id"] != owner and not is_alive(sup, at)}
            live = {sup["id"] for sup in rows} - dead
            for row in _rows(self.conn.execute(
                    "SELECT id, task, owner, attempts FROM jobs WHERE state = 'running'")):
                if row["owner"] != owner and row["owner"] not in live:
                    state = self._requeue(row["id"], row["owner"], row["attempts"],
                                          f"recovered: supervisor {row['owner']} is gone",
                                          True, False, True, None, at)
                    recovered.append((row, state))
            for sup_id in dead:
                self.conn.execute("DELETE FROM supervisors WHERE id = ?", (sup_id,))
        for row, state in recovered:
            log.warning("job %d %s recovered from dead supervisor %s: %s", row["id"],
                        row["task"], row["owner"], state)
        return recovered

    def shed_due(self, *, tasks=None, at=None, pressure=None):
        """Skip every due low-priority job of a shed=True task (memory pressure)."""
        return self._skip_where(
            f"priority = {LOW} AND shed = 1 AND due_at <= :at", tasks, at,
            "shed under memory pressure", pressure)

    def expire(self, *, at=None):
        """Skip every waiting job whose TTL ran out, whatever else holds it back."""
        return self._skip_where(_EXPIRED, None, at, "expired", None)

    def _skip_where(self, condition, tasks, at, reason, pressure):
        at = now() if at is None else at
        params = {"at": at, "tasks": None if tasks is None else json.dumps(sorted(tasks))}
        task_clause = "" if tasks is None else " AND task IN (SELECT value FROM json_each(:tasks))"
        select = f"SELECT id, task FROM jobs WHERE state = 'queued' AND {condition}{task_clause}"
        if not self._read(select + " LIMIT 1", params):
            return []                   # the common case stays a read, with no write lock
        with self._tx():
            rows = _rows(self.conn.execute(select, params))
            for row in rows:
                self.conn.execute("UPDATE jobs SET state = 'skipped', finished_at = ?,"
                                  " error = ? WHERE id = ?", (at, reason, row["id"]))
                self._event(at, row["id"], row["task"], "job", QUEUED, SKIPPED, reason, pressure)
        return [row["id"] for row in rows]

    def record_event(self, kind, from_state, to_state, reason, *, job_id=None, task=None,
                     pressure=None, at=None):
        """A supervisor decision or level change, kept with the jobs it concerns."""
        with self._tx():
            self._event(now() if at is None else at, job_id, task, kind, from_state, to_state,
                        reason, pressure)

    def live_supervisors(self, at=None):
        """The supervisors taken for alive, as recovery takes them (supervisor_alive): one on
        this host while its process lives, so one killed with -9 is gone at once rather than
        after its lease; one elsewhere while its lease is fresh."""
        at = now() if at is None else at
        host = host_identity()
        return [sup for sup in self._read("SELECT * FROM supervisors")
                if supervisor_alive(sup, host, at)]

    def running_pids(self, at=None):
        """{job id: pid of the child running it}, as live supervisors last reported."""
        return {item["id"]: item.get("pid") for sup in self.live_supervisors(at)
                for item in json.loads(sup["running"])}


class _Operator(_Leases):
    """What an operator reads and steers by hand: events, counts, `status`, breakers."""

    def events(self, job_id=None, kind=None, limit=1000, since=None, newest=False):
        """Recorded events, oldest first: the first `limit` of them, or with newest=True
        the last. since: only those at or after that time (epoch seconds)."""
        where, params = self._where(job_id=job_id, kind=kind)
        if since is not None:
            where += (" AND " if where else "WHERE ") + "at >= ?"
            params.append(float(since))
        params.append(-1 if limit is None else parse_positive_int(limit, "limit"))
        if not newest:
            return self._read(f"SELECT * FROM events {where} ORDER BY id LIMIT ?", params)
        return self._read(f"SELECT * FROM (SELECT * FROM events {where} ORDER BY id DESC"
                          f" LIMIT ?) ORDER BY id", params)

    def metrics_text(self, at=None):
        """The Prometheus text exposition (format 0.0.4) of this file: jobs by state and
        priority, memory, breakers, heartbeat age, oldest waiting job, finished jobs (a
        counter). Labels are task names, states, priorities and levels: never a job id or
        payload. One scan of `jobs` and a few index seeks (~30 ms for 100k jobs: see bench.py)."""
        at = now() if at is None else at
        jobs = {(state, priority): 0 for state in STATES for priority in PRIORITIES}
        finished = {}
        for row in self._read("SELECT task, state, priority, count(*) AS n FROM jobs"
                              " GROUP BY task, state, priority"):
            jobs[row["state"], PRIORITY_NAMES[row["priority"]]] += row["n"]
            if row["state"] in FINAL_STATES:
                key = (row["task"], row["state"])
                finished[key] = finished.get(key, 0) + row["n"]
        for row in self._read("SELECT task, state, n FROM finished_counts"):
            key = (row["task"], row["state"])
            finished[key] = finished.get(key, 0) + row["n"]
        memory = self._memory_status(self.live_supervisors(at))
        heartbeat = self._read("SELECT value FROM meta WHERE key = 'heartbeat_at'")
        oldest = {}
        for name, priority in PRIORITIES.items():     # jobs_claim: one seek each
            due_at = self._read("SELECT min(due_at) AS due_at FROM jobs"
                                " WHERE state = 'queued' AND priority = ?", (priority,))
            due_at = due_at[0]["due_at"]
            oldest[name] = 0.0 if due_at is None else max(0.0, at - due_at)
        return _exposition([
            ("litequeue_jobs", "gauge", "Jobs in the file by state and priority.",
             [({"state": st, "priority": pr}, n) for (st, pr), n in jobs.items()]),
            ("litequeue_memory_pressure_ratio", "gauge",
             "Memory pressure (0-1) a live supervisor last recorded, else the machine's.",
             [({}, min(1.0, max(0.0, memory["pressure"] / 100.0)))]),
            ("litequeue_memory_level", "gauge", "1 for the current memory level, 0 for the others.",
             [({"level": level}, int(level == memory["level"])) for level in LEVELS]),
            ("litequeue_breaker_open", "gauge",
             "1 while a task's circuit breaker is open or half-open, 0 when closed.",
             [({"task": b["task"]}, int(b["state"] != "closed")) for b in self.breakers(at)]),
            ("litequeue_heartbeat_age_seconds", "gauge",
             "Seconds since a heartbeat job last finished done (NaN if never).",
             [({}, math.nan if not heartbeat
               else max(0.0, at - float(heartbeat[0]["value"])))]),
            ("litequeue_oldest_queued_age_seconds", "gauge",
             "Seconds the longest-waiting queued job of each priority has been due (0: none).",
             [({"priority": name}, age) for name, age in oldest.items()]),
            ("litequeue_jobs_finished_total", "counter",
             "Jobs that reached a final state, by task and state (purged ones included).",
             [({"task": task, "state": state}, n)
              for (task, state), n in sorted(finished.items())]),
        ])

    def pressure_history(self, since=None):
        """Memory samples of live and past supervisors, oldest first, at or after `since`
        (epoch seconds; all kept, 24 h, without): dicts of at, pressure (percent), level,
        tree_bytes (None without a budget) and supervisor (its id)."""
        where, params = ("WHERE at >= ?", (float(since),)) if since is not None else ("", ())
        return self._read(f"SELECT at, pressure, level, tree_bytes, supervisor FROM"
                          f" pressure_samples {where} ORDER BY at, id", params)

    @staticmethod
    def _where(**columns):
        """A WHERE clause matching the columns given (None: any value), and its parameters."""
        given = {name: value for name, value in columns.items() if value is not None}
        clause = " AND ".join(f"{name} = ?" for name in given)
        return (f"WHERE {clause}" if given else ""), list(given.values())

    def stats(self, at=None):
        """{"jobs": counts by state, "priorities": {priority: {state: n}}}. A queued job whose
        TTL ran out by `at` counts as skipped, as the next sweep (expire()) will store it:
        a read never writes, and without a supervisor nobody sweeps."""
        counts = {state: 0 for state in STATES}
        by_priority = {name: {} for name in PRIORITIES}
        for row in self._read(f"SELECT CASE WHEN state = 'queued' AND {_EXPIRED} THEN 'skipped'"
                              f" ELSE state END AS shown, priority, count(*) AS n FROM jobs"
                              f" GROUP BY shown, priority", {"at": now() if at is None else at}):
            counts[row["shown"]] += row["n"]
            by_priority[PRIORITY_NAMES[row["priority"]]][row["shown"]] = row["n"]
        return {"jobs": counts, "priorities": by_priority}

    def reset_breaker(self, task):
        """Close a task's breaker by hand; returns the state it was in, as users saw it."""
        with self._tx():
            at = now()
            known = self.conn.execute("SELECT 1 FROM tasks WHERE name = ? UNION ALL SELECT 1"
                                      " FROM breakers WHERE task = ?", (task, task)).fetchall()
            if not known:
                raise UnknownTask(f"no task {task!r} in this file's catalogue or breakers")
            row = _load_breaker(self.conn, task, at)
            _store_breaker(self.conn, row, new_breaker(task, at), at, "reset by hand")
            return effective_breaker_state(row, at)

    def breakers(self, at=None):
        """Every task's breaker as users see it (an open one past its cooldown: half-open)."""
        at = now() if at is None else at
        return [{"task": r["task"], "state": effective_breaker_state(r, at),
                 "failures": len(json.loads(r["failures"])), "opened_at": r["opened_at"],
                 "cooldown_s": r["cooldown_s"], "trial_job_id": r["trial_job_id"]}
                for r in self._read("SELECT * FROM breakers ORDER BY task")]

    def status(self, at=None):
        """Everything `status` shows, as one dict (the keys of `status --json`)."""
        at = now() if at is None else at
        stats = self.stats(at)
        supervisors = self.live_supervisors(at)
        served = set()
        reported = {}                               # job id: what its supervisor reported
        for sup in supervisors:
            served.update(json.loads(sup["tasks"]))
            reported.update((item["id"], item) for item in json.loads(sup["running"]))
        running = [{
            "id": r["id"], "task": r["task"], "priority": PRIORITY_NAMES[r["priority"]],
            "started_at": r["started_at"], "attempts": r["attempts"],
            "rss_bytes": reported.get(r["id"], {}).get("rss_bytes"),
            "pid": reported.get(r["id"], {}).get("pid", r["pid"]),
            "output_bytes": self.output_bytes(r["id"]),
            "progress": (None if r["progress_done"] is None
                         else {"done": r["progress_done"], "total": r["progress_total"]}),
        } for r in self._read("SELECT * FROM jobs WHERE state = 'running' ORDER BY id")]
        waiting = [r["task"] for r in self._read(
            f"SELECT DISTINCT task FROM jobs WHERE state = 'queued' AND NOT ({_EXPIRED})",
            {"at": at})]
        heartbeat = self._read("SELECT value FROM meta WHERE key = 'heartbeat_at'")
        return {
            "jobs": stats["jobs"],
            "priorities": stats["priorities"],
            "running": running,
            "memory": self._memory_status(supervisors),
            "breakers": {b["task"]: effective_breaker_state(b, at)
                         for b in self._read("SELECT * FROM breakers ORDER BY task")},
            "heartbeat_age": (None if not heartbeat
                              else round(max(0.0, at - float(heartbeat[0]["value"])), 3)),
            "isolation": _isolation_of(supervisors),
            "supervisors": [{"id": s["id"], "pid": s["pid"], "level": s["level"],
                             "pressure": s["pressure"], "isolation": s["isolation"],
                             "heartbeat_age": round(at - s["heartbeat_at"], 3)}
                            for s in supervisors],
            "unserved": sorted(task for task in waiting if task not in served),
            "max_depth": self.max_depth,
        }

    # -- job output (see the child section: fds 1 and 2 of a job's child are its file) ----

    @property
    def output_dir(self):
        return output_dir_of(self.path)

    def output_path(self, job_id):
        """The job's output file, or None when it has none (it never ran, or was purged);
        JobNotFound for no such job, OutputRefused for an unsafe output directory."""
        job_id = self.get(job_id).id
        if not check_output_dir(self.output_dir, create=False):
            return None
        path = output_file_of(self.output_dir, job_id)
        return path if os.path.isfile(path) else None

    def output(self, job_id, offset=0):
        """The job's output from byte `offset` on (b"" when it has none). Read in one piece:
        for a large output, read output_path() in chunks (as `jobs output` does)."""
        path = self.output_path(job_id)
        if path is None:
            return b""
        with open(path, "rb") as f:
            f.seek(max(0, int(offset)))
            return f.read()

    def output_bytes(self, job_id):
        """The size of a job's output file (None when it has none); no checks, a stat."""
        try:
            return os.stat(output_file_of(self.output_dir, job_id)).st_size
        except OSError:
            return None

    def _remove_outputs(self, job_ids):
        """Delete the output files of jobs just purged; never through an unsafe directory."""
        try:
            if not check_output_dir(self.output_dir, create=False):
                return
        except OutputRefused as exc:
            log.warning("purge: %s; outputs left in place", exc)
            return
        for job_id in job_ids:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(output_file_of(self.output_dir, job_id))

    @staticmethod
    def _memory_status(supervisors):
        readings = [s for s in supervisors if s["pressure"] is not None]
        if readings:
            worst = max(readings, key=lambda s: (LEVELS.index(s["level"]), s["pressure"]))
            memory = {"level": worst["level"], "pressure": round(worst["pressure"], 1)}
        else:
            memory = {"level": "normal", "pressure": round(MemoryProbe().machine_percent(), 1)}
        psi = read_psi()
        if psi is not None:
            memory["psi"] = psi
        return memory



def _isolation_of(supervisors):
    """How hard the live supervisors' job limits are: "cgroup" or "rlimit" where they agree,
    "mixed" where they do not, None with no supervisor alive."""
    kinds = {sup["isolation"] for sup in supervisors}
    return None if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"


def write_atomically(path, text, mode=0o644):
    """Replace the file at path with text in one step (a temporary file in the same
    directory, then os.replace): a reader such as node_exporter never sees half of it."""
    import tempfile
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temp = tempfile.mkstemp(prefix=".litequeue-", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with open(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)       # mkstemp makes it 0600: the collector must read it
            f.write(text)
        os.replace(temp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise BadInput(f"cannot write {path}: {exc.strerror}") from exc
        raise


def _exposition(families):
    """Prometheus text format 0.0.4 of [(name, type, help, [(labels, value)])]."""
    lines = []
    for name, kind, help_text, samples in families:
        lines.append(f"# HELP {name} {help_text}")      # (constants: nothing to escape)
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{key}="{_label_value(val)}"' for key, val in labels.items())
            lines.append(f"{name}{{{label_text}}} {_sample_value(value)}" if label_text
                         else f"{name} {_sample_value(value)}")
    return "\n".join(lines) + "\n"


def _label_value(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample_value(value):
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(round(value, 6))


class Queue(_Operator):
    """A litequeue file: enqueue, inspect and steer jobs; register tasks with @queue.task.

    One Queue may be shared by any number of threads (a threaded web server's handlers, a
    thread pool): its calls take turns on its one connection. An asyncio app awaits
    `await queue.aenqueue(...)` (enqueue's arguments), which runs the enqueue in a worker
    thread so the event loop is not held up while the commit waits for the disk. After
    close(), any call raises QueueClosed."""

    def __init__(self, path=None, max_depth=None, *, durable=True,
                 busy_timeout=DEFAULT_BUSY_TIMEOUT_S, breaker=None, create=True, _checked=False):
        # Every argument is checked before the file is touched: bad input creates nothing.
        self.path = self._checked_path(path) if path is not None else default_db_path()
        if max_depth is not None:
            self._checked_max_depth(max_depth)
        if not isinstance(durable, bool):
            raise BadInput(f"durable must be True or False, not {durable!r:.40}")
        self.durable = durable
        self.busy_timeout_s = parse_duration(busy_timeout, "busy_timeout")
        if self.busy_timeout_s * 1000 >= 1 << 31:       # SQLite takes it as a C int of ms
            raise BadInput(f"busy_timeout: {busy_timeout!r:.40} is too long (at most 24 days)")
        if breaker is not None and not isinstance(breaker, BreakerPolicy):
            raise BadInput(f"breaker must be a litequeue.BreakerPolicy, not {breaker!r:.40}")
        self.breaker_policy = breaker or BreakerPolicy()
        self.registry = {}
        self._lock = threading.RLock()          # see _Store
        self._closed = False
        self.conn = open_database(self.path, durable=durable, busy_timeout_s=self.busy_timeout_s,
                                  create=create, checked=_checked)
        if max_depth is not None:
            self.set_max_depth(max_depth)

    # -- plumbing -----------------------------------------------------------------------

    @staticmethod
    def _checked_path(path):
        """The database path as a str, from a str, bytes or os.PathLike."""
        try:
            text = os.fsdecode(path)
        except TypeError:
            raise BadInput(f"database path must be a str, bytes or os.PathLike, not "
                           f"{type(path).__name__} {path!r:.40}") from None
        if not text or "\0" in text:
            raise BadInput(f"database path must be a non-empty path without NUL, not {path!r:.60}")
        return text

    def close(self):
        """Close the connection; using the Queue afterwards raises QueueClosed."""
        with self._lock:
            self._closed = True
            self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<Queue {self.path}>"

    # -- settings stored in the file ----------------------------------------------------

    def set_max_depth(self, max_depth):
        """Store the file's queued-job limit (0 = unbounded); every producer obeys it."""
        self._checked_max_depth(max_depth)
        with self._tx():
            self.conn.execute("INSERT INTO meta (key, value) VALUES ('max_depth', ?)"
                              " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                              (str(max_depth),))

    @staticmethod
    def _checked_max_depth(max_depth):
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0:
            raise BadInput(f"max_depth must be a whole number >= 0, not {max_depth!r:.40}")

    @property
    def max_depth(self):
        rows = self._read("SELECT value FROM meta WHERE key = 'max_depth'")
        return int(rows[0]["value"]) if rows else 0

    # -- tasks --------------------------------------------------------------------------

    def task(self, fn=None, *, name=None, priority="normal", max_attempts=DEFAULT_MAX_ATTEMPTS,
             timeout=None, memory_limit=None, ttl=None, shed=False, unique=False,
             breaker_failures=None, breaker_window=None):
        """Register a task (decorator, with or without arguments) and store its defaults in
        the file's catalogue."""
        def register(func):
            if memory_limit is not None:
                parse_memory_size(memory_limit, "memory_limit")
            defaults = TaskDefaults(name or func.__name__, priority, max_attempts, timeout,
                                    memory_limit, ttl, shed, unique, breaker_failures,
                                    breaker_window)
            task = Task(self, func, defaults)
            self.registry[task.name] = task
            self.store_catalogue([defaults])
            return task
        return register(fn) if fn is not None else register

    def store_catalogue(self, defaults_list):
        """Write declared task defaults where they differ from what the file holds."""
        stored = self.catalogue()
        changed = [d for d in defaults_list if stored.get(d.name) != d]
        if changed:
            with self._tx():
                at = now()
                for defaults in changed:
                    _store_catalogue_row(self.conn, defaults, at)

    def catalogue(self):
        """{name: TaskDefaults} of every task this file knows."""
        rows = self._read(f"SELECT {_CATALOGUE_COLUMNS} FROM tasks")
        return {row["name"]: TaskDefaults(**row) for row in rows}

    def _defaults_for(self, name):
        task = self.registry.get(name)
        if task is not None:
            return task.defaults, True
        rows = self._read(f"SELECT {_CATALOGUE_COLUMNS} FROM tasks WHERE name = ?", (name,))
        if rows:
            return TaskDefaults(**rows[0]), True
        return TaskDefaults(name), False

    def is_known_task(self, name):
        return self._defaults_for(check_name(name))[1]

    # -- enqueue ------------------------------------------------------------------------

    def enqueue(self, task, payload=None, *, priority=None, unique=None, delay=None, ttl=None,
                max_attempts=None, timeout=None, memory_limit=None, wait=None):
        """Add a job and return its id (or the id of the waiting job holding the same unique
        key). Raises QueueFull when max_depth jobs are queued; with `wait` (seconds, "30s"),
        only once up to that long went by without another process making room."""
        wait_s = _checked_wait(wait)
        checked = _checked_input(task, payload, priority=priority, unique=unique, delay=delay,
                                 ttl=ttl, max_attempts=max_attempts, timeout=timeout,
                                 memory_limit=memory_limit)
        return self._when_room(wait_s, lambda: self._enqueue_checked(checked))

    def _enqueue_checked(self, checked):
        at = now()
        with self._tx():
            row = self._job_row(*checked, at)
            existing = self._holder_of(row["unique_key"], at)
            if existing is None:
                self._check_depth(1)
                job_id = self._insert_job(row)
        _warn_if_unknown([row])
        return job_id if existing is None else existing

    async def aenqueue(self, task, payload=None, *, priority=None, unique=None, delay=None,
                       ttl=None, max_attempts=None, timeout=None, memory_limit=None,
                       wait=None):
        """enqueue() for asyncio code: the same, run in a worker thread, so the event loop
        goes on while the commit waits for its fsync, or the producer for room."""
        import asyncio
        return await asyncio.to_thread(
            self.enqueue, task, payload, priority=priority, unique=unique, delay=delay,
            ttl=ttl, max_attempts=max_attempts, timeout=timeout, memory_limit=memory_limit,
            wait=wait)

    def enqueue_many(self, jobs, *, wait=None):
        """Enqueue a batch in one transaction; all or nothing. Each item is a task name, a
        (task, payload) pair, or a dict of enqueue's arguments. Returns the ids in order.
        `wait`: as enqueue's, for room for the whole batch."""
        wait_s = _checked_wait(wait)
        checked = [_checked_input(**self._as_enqueue_args(item)) for item in jobs]
        return self._when_room(wait_s, lambda: self._enqueue_many_checked(checked))

    def _enqueue_many_checked(self, checked):
        at = now()
        with self._tx():
            rows = [self._job_row(*item, at) for item in checked]
            ids, new_rows, first_with_key = [None] * len(rows), [], {}
            for index, row in enumerate(rows):
                key = row["unique_key"]
                ids[index] = self._holder_of(key, at)
                if ids[index] is None and key not in first_with_key:
                    new_rows.append((index, row))
                    if key is not None:
                        first_with_key[key] = index
            self._check_depth(len(new_rows))
            for index, row in new_rows:
                ids[index] = self._insert_job(row)
            for index, row in enumerate(rows):      # later duplicates of a key in this batch
                if ids[index] is None:
                    ids[index] = ids[first_with_key[row["unique_key"]]]
        _warn_if_unknown(rows)
        return ids

    def _when_room(self, wait_s, enqueue):
        """enqueue(), and while it raises QueueFull, again for up to wait_s seconds: the
        producer pauses on a full queue (backpressure) rather than drop its job or spin."""
        try:
            return enqueue()
        except QueueFull:
            if not wait_s:
                raise
        deadline_tick = time.monotonic() + wait_s
        with _RoomWatch(self.path) as watch:
            while True:
                watch.pause(deadline_tick - time.monotonic())
                try:
                    return enqueue()
                except QueueFull as exc:
                    if time.monotonic() >= deadline_tick:
                        raise QueueFull(f"{exc} (still, after waiting {wait_s:g}s)") from None

    @staticmethod
    def _as_enqueue_args(item):
        if isinstance(item, str):
            return {"task": item}
        if isinstance(item, dict):
            return dict(item)
        if isinstance(item, (tuple, list)) and len(item) == 2:
            return {"task": item[0], "payload": item[1]}
        raise BadInput(f"enqueue_many: cannot read {item!r:.60} as a job")

    def _job_row(self, task, payload_json, given, at):
        """The row of a new job: checked input over the task's defaults (read inside the
        enqueue's transaction, so an enqueue is one transaction, not a read and a write)."""
        defaults, known = self._defaults_for(task)
        unique = given["unique"]
        if unique is None or unique is False:
            unique_key = task if (unique is None and defaults.unique_task) else None
        else:
            unique_key = task if unique is True else unique
        ttl_s = defaults.ttl_s if given["ttl_s"] is None else given["ttl_s"]
        due_at = at + given["delay_s"]

        def pick(name):
            return getattr(defaults, name) if given[name] is None else given[name]
        return {
            "task": task,
            "payload": payload_json,
            "priority": pick("priority"),
            "unique_key": unique_key,
            "max_attempts": pick("max_attempts"),
            "timeout_s": pick("timeout_s"),
            "memory_limit_bytes": pick("memory_limit_bytes"),
            "overrides": sum(bit for name, bit in self.RESOLVED_AT_CLAIM.items()
                             if given[name] is not None),
            "shed": int(defaults.shed),
            "created_at": at,
            "due_at": due_at,
            "expires_at": None if ttl_s is None else due_at + ttl_s,
            "known_task": known,        # not a column: whether to warn of a typo
        }

    def _holder_of(self, unique_key, at):
        """Id of the active job holding unique_key; an expired waiting holder is skipped first,
        so a stale heartbeat never blocks the next one."""
        if unique_key is None:
            return None
        rows = _rows(self.conn.execute(
            "SELECT id, state, expires_at, task FROM jobs WHERE unique_key = ?"
            " AND state IN ('queued', 'running')", (unique_key,)))
        for row in rows:
            if row["state"] == QUEUED and row["expires_at"] is not None and row["expires_at"] <= at:
                self._finish(row["id"], row["task"], QUEUED, SKIPPED, at, "expired")
            else:
                return row["id"]
        return None

    def _check_depth(self, adding):
        if not adding:
            return
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'max_depth'").fetchall()
        max_depth = int(row[0][0]) if row else 0
        if max_depth <= 0:
            return
        # Counting stops at max_depth: cost is bounded by the limit, not the queue size.
        queued = self.conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM jobs WHERE state = 'queued' LIMIT ?)",
            (max_depth,)).fetchall()[0][0]
        if queued + adding > max_depth:
            raise QueueFull(f"queue is full: {queued} jobs queued, max_depth is {max_depth}")

    def _insert_job(self, row):
        self.conn.execute(
            "INSERT INTO jobs (task, payload, priority, state, unique_key, max_attempts,"
            " timeout_s, memory_limit_bytes, overrides, shed, created_at, due_at, expires_at)"
            " VALUES (:task, :payload, :priority, 'queued', :unique_key, :max_attempts,"
            " :timeout_s, :memory_limit_bytes, :overrides, :shed, :created_at, :due_at,"
            " :expires_at)", row)
        # No event: the row's created_at records the creation, and the events table records
        # what happens to a job from then on (measured: an events row per enqueue costs a
        # tenth of the enqueue rate under synchronous=FULL).
        return self.conn.last_insert_rowid()

    # -- inspect ------------------------------------------------------------------------

    def get(self, job_id):
        """The job with that id; JobNotFound if there is none."""
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (self._job_id(job_id),))
        if not rows:
            raise JobNotFound(f"no job {job_id}")
        job = Job(rows[0])
        if job.state == RUNNING and job.pid is None:
            # The row has a pid only for a job a pooled child went on to; otherwise it is
            # in the supervisor's report of what its children run.
            job.pid = self.running_pids().get(job.id)
        return job

    @staticmethod
    def _job_id(job_id):
        try:
            value = int(job_id)
        except (TypeError, ValueError):
            raise BadInput(f"job id must be a whole number, not {job_id!r:.40}") from None
        if isinstance(job_id, bool) or value < 1 or value >= 1 << 63:
            raise JobNotFound(f"no job {job_id}")
        return value

    def jobs(self, state=None, task=None, limit=100):
        """Jobs, newest first, filtered by state and/or task."""
        if state is not None and state not in STATES:
            raise BadInput(f"unknown state {state!r}: use one of {', '.join(STATES)}")
        where, params = self._where(state=state, task=task)
        params.append(-1 if limit is None else parse_positive_int(limit, "limit"))
        return [Job(r) for r in self._read(
            f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT ?", params)]

    # -- steer --------------------------------------------------------------------------

    def cancel(self, job_id):
        """Cancel a job. Queued: cancelled now. Running: its supervisor is asked to stop it
        (like a preemption), kill it after the grace period, and mark it cancelled.
        Returns the job's state after the call."""
        job = self.get(job_id)
        with self._tx():
            at = now()
            row = self.conn.execute("SELECT state FROM jobs WHERE id = ?", (job.id,)).fetchall()
            state = row[0][0]
            if state == QUEUED:
                self._finish(job.id, job.task, QUEUED, CANCELLED, at, "cancelled")
                return CANCELLED
            if state == RUNNING:
                self.conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job.id,))
                self._event(at, job.id, job.task, "decision", RUNNING, RUNNING, "cancel requested")
                return RUNNING
        raise InvalidState(f"job {job.id} is {state}; only queued or running jobs can be cancelled")

    def retry(self, job_id):
        """Put a dead, skipped or cancelled job back to queued with fresh attempts."""
        job = self.get(job_id)
        if job.state not in (DEAD, SKIPPED, CANCELLED):
            raise InvalidState(f"job {job.id} is {job.state}; only dead, skipped or cancelled "
                               f"jobs can be retried")
        with self._tx():
            at = now()
            if job.unique_key is not None and self._holder_of(job.unique_key, at) is not None:
                raise InvalidState(f"job {job.id} cannot be retried: another active job holds "
                                   f"its unique key {job.unique_key!r}")
            expires_at = (None if job.expires_at is None
                          else at + (job.expires_at - job.due_at))
            self.conn.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, due_at = ?, expires_at = ?,"
                " finished_at = NULL, cancel_requested = 0 WHERE id = ? AND state = ?",
                (at, expires_at, job.id, job.state))
            if not self.conn.changes():
                raise InvalidState(f"job {job.id} changed state meanwhile; try again")
            self._count_finished("VALUES (?, ?, 1)", (job.task, job.state))
            self._event(at, job.id, job.task, "job", job.state, QUEUED, "retried by hand")
        return job.id

    def purge(self, older_than, *, at=None):
        """Delete final jobs that finished more than older_than ago, with their events,
        checkpoints and output files. Returns how many jobs were deleted."""
        cutoff = (now() if at is None else at) - parse_duration(older_than, "older_than")
        deleted = 0
        while True:     # in batches, so producers never wait long for the write lock
            with self._tx():
                ids = [r[0] for r in self.conn.execute(
                    "SELECT id FROM jobs WHERE finished_at < ? AND state IN"
                    " ('done', 'dead', 'cancelled', 'skipped') LIMIT 2000", (cutoff,))]
                if ids:
                    marks = ",".join("?" * len(ids))
                    self._count_finished(f"SELECT task, state, count(*) FROM jobs WHERE id IN"
                                         f" ({marks}) GROUP BY task, state", ids)
                    self.conn.execute(f"DELETE FROM events WHERE job_id IN ({marks})", ids)
                    self.conn.execute(f"DELETE FROM jobs WHERE id IN ({marks})", ids)
                self.conn.execute("DELETE FROM events WHERE job_id IS NULL AND at < ?",
                                  (cutoff,))
            self._remove_outputs(ids)     # after the commit: a failed purge keeps them all
            deleted += len(ids)
            if len(ids) < 2000:
                break
        self._read("PRAGMA incremental_vacuum")
        return deleted

    def _count_finished(self, rows_sql, params):
        """Add (task, state, n) rows to finished_counts: finished jobs that leave `jobs` in
        that state (purged, retried), so litequeue_jobs_finished_total never goes down."""
        self.conn.execute(f"INSERT INTO finished_counts (task, state, n) SELECT * FROM"
                          f" ({rows_sql}) WHERE true ON CONFLICT (task, state)"
                          f" DO UPDATE SET n = n + excluded.n", params)

    def checkpoint_wal(self):
        """Fold the WAL back into the file and truncate it (retention; long runs)."""
        # No busy wait: a reader holding a snapshot would stall the caller (the supervisor
        # loop) for the whole busy timeout; the next round finishes the job.
        with self._using():
            self.conn.set_busy_timeout(0)
            try:
                return self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0]
            except apsw.BusyError:
                return None
            except apsw.Error as exc:
                raise _translate(exc, self.path) from None
            finally:
                self.conn.set_busy_timeout(int(self.busy_timeout_s * 1000))


def _checked_wait(wait, what="wait"):
    """Seconds a producer may wait for room on a full queue: 0 for None."""
    return 0.0 if wait is None else parse_duration(wait, what)


class _RoomWatch:
    """How a producer waits for room: until another process writes the file (inotify on its
    directory; that write may be a job leaving the queue) or a backoff runs out, 10 ms
    doubling to 0.5 s, whichever comes first; the backoff alone where inotify is missing.
    A failed enqueue writes nothing, so our own tries never wake us. A write wakes us before
    its commit is visible (see _Sleeper.sleep), and writes that make no room (a heartbeat,
    progress) wake us too: after a wake, the backoff starts again from its shortest."""

    def __init__(self, path):
        import ctypes
        self.watch = _DirectoryWatch.open(path, ctypes.CDLL(None, use_errno=True))
        self.pause_s = ROOM_WAIT_FIRST_S

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.watch is not None:
            self.watch.close()

    def pause(self, left_s):
        """Until a write, the backoff or left_s, whichever comes first."""
        import select
        timeout_s = max(0.0, min(self.pause_s, left_s))
        if self.watch is None:
            time.sleep(timeout_s)
            woken = False
        else:
            woken = bool(select.select([self.watch.fd], [], [], timeout_s)[0])
            if woken:
                self.watch.drain()
        self.pause_s = ROOM_WAIT_FIRST_S if woken else min(2 * self.pause_s, ROOM_WAIT_MAX_S)


def _warn_if_unknown(rows):
    """Warn (once per task name and caller) of a job whose task no code declared to this
    file: a typo in a name is otherwise silent until nobody ever runs the job."""
    unknown = sorted({row["task"] for row in rows if not row["known_task"]})
    if unknown:
        import warnings
        warnings.warn(f"task {', '.join(map(repr, unknown))} is not in this file's catalogue "
                      f"(a typo?); enqueued with the global defaults", UnknownTaskWarning,
                      stacklevel=3)


def _last_line(text):
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


# ======================================================================================
# Circuit breaker: one per task name, its state a row in the file
# ======================================================================================
#
#   closed --(N failures within the window)--> open --(cooldown over)--> half-open
#   half-open --(the one trial job succeeds)--> closed
#   half-open --(the trial fails)--> open, cooldown doubled up to the cap
#
# The transitions are pure functions of (row, event, time); the functions after them load
# and store the row inside the caller's transaction, so every supervisor and every child
# sees one breaker per task, and exactly one trial job runs even with two supervisors.

class BreakerPolicy:
    """How many failures within what window open a breaker, and for how long."""

    __slots__ = ("failures", "window_s", "cooldown_s", "max_cooldown_s")

    def __init__(self, failures=BREAKER_FAILURES, window_s=BREAKER_WINDOW_S,
                 cooldown_s=BREAKER_COOLDOWN_S, max_cooldown_s=BREAKER_MAX_COOLDOWN_S):
        self.failures = parse_positive_int(failures, "breaker failures")
        self.window_s = parse_duration(window_s, "breaker window", allow_zero=False)
        self.cooldown_s = parse_duration(cooldown_s, "breaker cooldown", allow_zero=False)
        self.max_cooldown_s = max(self.cooldown_s, parse_duration(max_cooldown_s, "cooldown cap"))


def new_breaker(task, at):
    return {"task": task, "state": "closed", "failures": "[]", "opened_at": None,
            "cooldown_s": None, "trial_job_id": None, "updated_at": at}


def breaker_after_failure(row, at, policy, job_id=None):
    """The breaker after a failure of one of its task's jobs."""
    if row["state"] == "half-open":
        if job_id is not None and job_id != row["trial_job_id"]:
            return row                 # a job started before it opened: the trial decides
        cooldown = min(policy.max_cooldown_s, 2 * (row["cooldown_s"] or policy.cooldown_s))
        return {**row, "state": "open", "opened_at": at, "cooldown_s": cooldown,
                "trial_job_id": None, "failures": "[]", "updated_at": at}
    if row["state"] == "open":
        return row                     # a job started before it opened: already counted open
    recent = [t for t in json.loads(row["failures"]) if t >= at - policy.window_s] + [at]
    if len(recent) >= policy.failures:
        return {**row, "state": "open", "opened_at": at, "cooldown_s": policy.cooldown_s,
                "trial_job_id": None, "failures": "[]", "updated_at": at}
    return {**row, "failures": json.dumps(recent), "updated_at": at}


def breaker_after_success(row, job_id, at):
    """The breaker after a job of its task succeeded: a successful trial closes it."""
    if row["state"] == "half-open" and row["trial_job_id"] == job_id:
        return {**new_breaker(row["task"], at)}
    return row


def breaker_gate(row, at):
    """'closed' (run freely), 'trial' (one job may run now) or 'blocked'."""
    if row["state"] == "closed":
        return "closed"
    if row["state"] == "open":
        return "trial" if at >= row["opened_at"] + row["cooldown_s"] else "blocked"
    return "trial" if row["trial_job_id"] is None else "blocked"


def effective_breaker_state(row, at):
    """What users see: an open breaker whose cooldown is over reads as half-open."""
    if row["state"] == "open" and breaker_gate(row, at) == "trial":
        return "half-open"
    return row["state"]


def _load_breaker(conn, task, at):
    rows = _rows(conn.execute("SELECT * FROM breakers WHERE task = ?", (task,)))
    return rows[0] if rows else new_breaker(task, at)


def _insert_event(conn, at, job_id, task, kind, from_state, to_state, reason=None,
                  pressure=None):
    conn.execute(
        "INSERT INTO events (at, job_id, task, kind, from_state, to_state, reason, pressure)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (at, job_id, task, kind, from_state, to_state, reason, pressure))


def _store_breaker(conn, before, after, at, reason):
    if after is before:
        return
    conn.execute(
        "INSERT INTO breakers (task, state, failures, opened_at, cooldown_s, trial_job_id,"
        " updated_at) VALUES (:task, :state, :failures, :opened_at, :cooldown_s, :trial_job_id,"
        " :updated_at) ON CONFLICT (task) DO UPDATE SET state = excluded.state,"
        " failures = excluded.failures, opened_at = excluded.opened_at,"
        " cooldown_s = excluded.cooldown_s, trial_job_id = excluded.trial_job_id,"
        " updated_at = excluded.updated_at", after)
    if before["state"] != after["state"]:
        _insert_event(conn, at, after["trial_job_id"], after["task"], "breaker",
                      before["state"], after["state"], reason)
        log.warning("breaker %s: %s -> %s (%s)", after["task"], before["state"],
                    after["state"], reason)


def breakers_blocking(conn, at):
    """(tasks that may not start now, tasks whose next job is a half-open trial)."""
    blocked, trial = set(), set()
    for row in _rows(conn.execute("SELECT * FROM breakers WHERE state != 'closed'")):
        gate = breaker_gate(row, at)
        (blocked if gate == "blocked" else trial).add(row["task"])
    return blocked, trial


# Each of these runs inside its caller's transaction on `conn`.

def begin_trial(conn, task, job_id, at):
    row = _load_breaker(conn, task, at)
    _store_breaker(conn, row, {**row, "state": "half-open", "trial_job_id": job_id,
                               "updated_at": at}, at, f"cooldown over, trial job {job_id}")


def _policy_for(conn, policy, task):
    """The breaker policy, with the task's own thresholds from the catalogue."""
    rows = conn.execute("SELECT breaker_failures, breaker_window_s FROM tasks"
                        " WHERE name = ?", (task,)).fetchall()
    failures, window_s = rows[0] if rows else (None, None)
    if failures is None and window_s is None:
        return policy
    return BreakerPolicy(failures or policy.failures, window_s or policy.window_s,
                         policy.cooldown_s, policy.max_cooldown_s)


def breaker_failed(conn, policy, task, job_id, at):
    row = _load_breaker(conn, task, at)
    after = breaker_after_failure(row, at, _policy_for(conn, policy, task), job_id)
    _store_breaker(conn, row, after, at, f"job {job_id} failed")


def breaker_success(conn, task, job_id, at):
    row = _load_breaker(conn, task, at)
    if row["state"] != "closed":
        _store_breaker(conn, row, breaker_after_success(row, job_id, at), at,
                       f"trial job {job_id} succeeded")


def breaker_release_trial(conn, task, job_id, at):
    """A trial that ended neither well nor badly (preempted, cancelled, shut down, lost):
    the next job of the task becomes the trial."""
    row = _load_breaker(conn, task, at)
    if row["state"] == "half-open" and row["trial_job_id"] == job_id:
        _store_breaker(conn, row, {**row, "trial_job_id": None, "updated_at": at}, at, None)


def reset_breaker(queue, task):
    """Close a task's breaker by hand (Queue.reset_breaker)."""
    return queue.reset_breaker(task)


def list_breakers(queue, at=None):
    """Every task's breaker as users see it (Queue.breakers)."""
    return queue.breakers(at)


# ======================================================================================
# Memory: reading pressure, levels with hysteresis, and the decisions they call for
# ======================================================================================

class LevelTracker:
    """Memory level from pressure readings, with hysteresis.

    A level is entered as soon as pressure reaches its threshold. It is left only after
    pressure has stayed below (its threshold - margin) for hold_s; then the level becomes
    whatever the pressure calls for. Pure: time is passed in."""

    def __init__(self, thresholds=(70.0, 85.0, 95.0), margin=5.0, hold_s=10.0):
        thresholds = tuple(float(t) for t in thresholds)
        if len(thresholds) != 3 or not 0 < thresholds[0] < thresholds[1] < thresholds[2] <= 100:
            raise BadInput(f"thresholds must be three rising percentages, not {thresholds}")
        if not 0 <= float(margin) < thresholds[0]:
            raise BadInput(f"margin must be between 0 and the first threshold, not {margin}")
        self.thresholds, self.margin, self.hold_s = thresholds, float(margin), float(hold_s)
        self.level = "normal"
        self._below_since = None

    def level_for(self, pressure):
        rank = sum(pressure >= t for t in self.thresholds)
        return LEVELS[rank]

    def update(self, pressure, at):
        """Feed one reading; returns the level now in force."""
        called = self.level_for(pressure)
        current = LEVELS.index(self.level)
        if LEVELS.index(called) > current:
            self.level, self._below_since = called, None
        elif current > 0 and pressure < self.thresholds[current - 1] - self.margin:
            if self._below_since is None:
                self._below_since = at
            if at - self._below_since >= self.hold_s:
                self.level, self._below_since = called, None
        else:
            self._below_since = None
        return self.level


class RunningView:
    """What the memory decisions need to know of a running job."""

    __slots__ = ("job_id", "priority", "rss_bytes", "started_tick", "stop_reason", "preemptions")

    def __init__(self, job_id, priority, rss_bytes=0, started_tick=0.0, stop_reason=None,
                 preemptions=0):
        self.job_id, self.priority, self.rss_bytes = job_id, priority, rss_bytes or 0
        self.started_tick, self.stop_reason = started_tick, stop_reason
        self.preemptions = preemptions


class MemoryPlan:
    """What to do at one poll: which priorities may start, whether to shed, whom to stop."""

    __slots__ = ("start_priorities", "shed", "preempt", "kill")

    def __init__(self, start_priorities, shed=False, preempt=None, kill=()):
        self.start_priorities, self.shed = start_priorities, shed
        self.preempt, self.kill = preempt, tuple(kill)

    def __repr__(self):
        return (f"MemoryPlan(start={self.start_priorities}, shed={self.shed}, "
                f"preempt={self.preempt}, kill={self.kill})")


START_PRIORITIES = {"normal": (0, 1, 2, 3), "skip": (0, 1, 2), "preempt": (0, 1),
                    "emergency": (0,)}
STOPPING_FOR_MEMORY = ("preempt", "emergency")


def plan_memory(level, running):
    """The decisions of a memory level, given the running jobs. Pure.

    skip: start no low job, shed due low shed jobs. preempt: start only critical and high;
    ask one victim at a time (the lowest-priority normal or low job, largest RSS first among
    equals; fewest preemptions next, so one job is not always the one paused) to stop, and
    choose the next only once it is gone. emergency: kill every running job below critical."""
    plan = MemoryPlan(START_PRIORITIES[level], shed=level != "normal")
    if level == "emergency":
        plan.kill = tuple(r.job_id for r in running
                          if r.priority > CRITICAL and r.stop_reason != "emergency")
    elif level == "preempt" and not any(r.stop_reason == "preempt" for r in running):
        candidates = [r for r in running if r.priority >= NORMAL and r.stop_reason is None]
        if candidates:
            victim = min(candidates, key=lambda r: (-r.priority, -r.rss_bytes, r.preemptions,
                                                    -r.started_tick))
            plan.preempt = victim.job_id
    return plan


def read_psi():
    """The kernel's memory pressure stall info, where it has it: {"some_avg10": ...}."""
    try:
        with open("/proc/pressure/memory") as f:
            text = f.read()
    except OSError:
        return None
    psi = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        for field in fields:
            key, _, value = field.partition("=")
            if key in ("avg10", "avg60"):
                psi[f"{kind}_{key}"] = float(value)
    return psi


def _read_int(path):
    with open(path) as f:
        text = f.read().strip()
    return None if text == "max" else int(text)


def _stat_value(path, key):
    with open(path) as f:
        for line in f:
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


class CgroupMemory:
    """Used and limit bytes of the tightest memory cgroup this process lives in, or None.

    v2: memory.current - inactive_file over memory.max; v1: usage_in_bytes -
    total_inactive_file over limit_in_bytes. The process's own cgroup comes from
    /proc/self/cgroup; its ancestors are walked for the tightest limit."""

    def __init__(self, root="/sys/fs/cgroup", proc_self="/proc/self/cgroup"):
        self.usage_path = self.stat_path = self.inactive_key = None
        self.limit_bytes = None
        self.pressure_path = None    # the limiting v2 group's memory.pressure (PSI), if v2
        try:
            with open(proc_self) as f:
                lines = f.read().splitlines()
        except OSError:
            return
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                self._choose(os.path.join(root, "memory"), path, "memory.limit_in_bytes",
                             "memory.usage_in_bytes", "total_inactive_file")
            elif controllers == "" and os.path.exists(os.path.join(root, "cgroup.controllers")):
                self._choose(root, path, "memory.max", "memory.current", "inactive_file")

    def _choose(self, mount, path, limit_file, usage_file, inactive_key):
        """Walk from the process's cgroup up to the mount: keep the tightest set limit."""
        directory = os.path.join(mount, path.lstrip("/"))
        if not os.path.isdir(directory):
            directory = mount              # inside a container the mount is our cgroup
        while True:
            try:
                limit = _read_int(os.path.join(directory, limit_file))
            except (OSError, ValueError):
                limit = None
            if limit is not None and limit < (1 << 60) and (
                    self.limit_bytes is None or limit < self.limit_bytes):
                self.limit_bytes = limit
                self.usage_path = os.path.join(directory, usage_file)
                self.stat_path = os.path.join(directory, "memory.stat")
                self.inactive_key = inactive_key
                self.pressure_path = (os.path.join(directory, "memory.pressure")
                                      if limit_file == "memory.max" else None)
            if os.path.normpath(directory) == os.path.normpath(mount):
                return
            directory = os.path.dirname(directory)

    def used_percent(self):
        if self.limit_bytes is None:
            return None
        try:
            used = _read_int(self.usage_path) - _stat_value(self.stat_path, self.inactive_key)
        except (OSError, ValueError, TypeError):
            return None
        return 100.0 * max(0, used) / self.limit_bytes


# PSI triggers (the kernel's Documentation/accounting/psi.rst). A trigger only moves the next
# memory poll earlier, and the kernel signals it at most once per window, so a fire that
# calls for nothing costs one memory read (~40 us here) a window: the threshold can be low.
# 20 ms of "some" stall in a window: this machine idle stalled 0.5 ms in all since boot, and
# a job thrashing its page cache in a 64 MiB cgroup stalled ~20 ms every second.
PSI_STALL_US = 20_000
# 1 s where we may (CAP_SYS_RESOURCE: the kernel then checks the window every 100 ms); the
# kernel refuses other windows than multiples of 2 s without it (EINVAL, kernel >= 6.5),
# and checks those only every 2 s.
PSI_WINDOWS_US = (1_000_000, 2_000_000)
SYSTEM_MEMORY_PRESSURE = "/proc/pressure/memory"


def memory_pressure_files(cgroup, machine=SYSTEM_MEMORY_PRESSURE):
    """Where the kernel reports the memory stalls that matter to us, best first: the
    memory.pressure of the cgroup v2 group whose limit binds us (CgroupMemory found it),
    then the machine's (its stalls include the group's, and others')."""
    group = getattr(cgroup, "pressure_path", None)
    return (group, machine) if group else (machine,)


class _PressureTrigger:
    """A PSI trigger on a memory pressure file: its fd polls POLLPRI (not readable) once
    tasks stalled on memory for PSI_STALL_US within the window, and POLLERR if its cgroup
    is removed. open() raises OSError where the kernel has no PSI or refuses the trigger."""

    def __init__(self, fd, path, stall_us, window_us):
        self.fd, self.path, self.stall_us, self.window_us = fd, path, stall_us, window_us

    @classmethod
    def open(cls, path, windows_us=PSI_WINDOWS_US, stall_us=PSI_STALL_US):
        refused = None
        for window_us in windows_us:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                # The kernel puts a NUL over the write's last byte: without one of our
                # own it would cut the window's last digit (and answer EINVAL).
                os.write(fd, f"some {stall_us} {window_us}\0".encode())
                return cls(fd, path, stall_us, window_us)
            except OSError as exc:
                os.close(fd)
                if exc.errno != errno.EINVAL:
                    raise
                refused = exc               # a window this kernel (or we) may not use
        raise refused

    def describe(self):
        """Its file and trigger, e.g. "/proc/pressure/memory (some 20 ms in 2 s)"."""
        return f"{self.path} (some {self.stall_us / 1000:g} ms in {self.window_us / 1e6:g} s)"

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def open_pressure_trigger(cgroup, enabled=True, machine=SYSTEM_MEMORY_PRESSURE):
    """(a _PressureTrigger or None, one line saying which file, or why the supervisor falls
    back to its poll alone)."""
    if not enabled:
        return None, "PSI wake-ups off (--no-psi): memory is read at each poll only"
    refusals = []
    for path in memory_pressure_files(cgroup, machine):
        try:
            trigger = _PressureTrigger.open(path)
        except OSError as exc:
            refusals.append(f"{path}: {exc.strerror or exc}")
            continue
        return trigger, f"PSI wake-ups on: memory is read again when {trigger.describe()} fires"
    return None, (f"PSI wake-ups unavailable ({'; '.join(refusals)}): memory is read at each "
                  f"poll only")


def process_tree(pid):
    """pid and every process below it (programs a task started count as the job's), read
    from /proc/PID/task/TID/children: no scan of all of /proc."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        try:
            threads = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in threads:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as f:
                    pending.extend(int(child) for child in f.read().split())
            except (OSError, ValueError):
                pass
    return tree


def job_rss_bytes(pid):
    """Resident bytes of a job: its child and whatever that child started."""
    return sum(process_rss_bytes(p) or 0 for p in process_tree(pid))


def process_rss_bytes(pid):
    """Resident bytes of one process, from /proc/PID/statm (cheap), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def process_pss_bytes(pid):
    """Proportional set size of one process: pages shared after fork counted once across
    the tree, not once per process as a sum of RSS would."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return process_rss_bytes(pid) or 0


class MemoryReading:
    __slots__ = ("pressure", "machine_percent", "tree_bytes", "budget_percent")

    def __init__(self, pressure, machine_percent, tree_bytes=None, budget_percent=None):
        self.pressure, self.machine_percent = pressure, machine_percent
        self.tree_bytes, self.budget_percent = tree_bytes, budget_percent


class MemoryProbe:
    """Memory pressure as a percentage: the larger of the machine's (container-aware) use
    and the supervisor tree's PSS against the budget, where one is given."""

    PSS_REFRESH_S = 1.0

    def __init__(self, budget_bytes=None, cgroup=None):
        self.budget_bytes = budget_bytes
        self.cgroup = CgroupMemory() if cgroup is None else cgroup
        self._pss = {}          # pid -> (pss_bytes, rss_bytes, read_at) of the last PSS read

    def machine_percent(self):
        percent = self.cgroup.used_percent()
        if percent is None:
            import psutil
            memory = psutil.virtual_memory()
            percent = 100.0 * (memory.total - memory.available) / memory.total
        return percent

    def _pss_estimate(self, pid, at):
        """PSS is exact but costs ~0.2 ms a process (the kernel walks its page tables); RSS
        costs ~15 us. PSS is read again each second, or when RSS moved by more than 1% of
        the budget; in between, the last PSS plus the RSS growth since, so growth still
        counts at every poll."""
        rss = process_rss_bytes(pid)
        if rss is None:
            return 0
        last = self._pss.get(pid)
        if (last is None or at - last[2] >= self.PSS_REFRESH_S
                or abs(rss - last[1]) > self.budget_bytes / 100):
            pss = process_pss_bytes(pid)
            self._pss[pid] = (pss, rss, at)
            return pss
        return max(0, last[0] + rss - last[1])

    def read(self, child_pids=()):
        machine = self.machine_percent()
        if not self.budget_bytes:
            return MemoryReading(machine, machine)
        pids = [os.getpid()] + [p for child in child_pids for p in process_tree(child)]
        if set(pids) != set(self._pss):
            # A fork or an exit changes who shares which pages, and so everyone's PSS
            # (a fresh child's pages are the supervisor's too): read them all again.
            self._pss = {}
        at = time.monotonic()
        tree = sum(self._pss_estimate(pid, at) for pid in pids)
        budget = 100.0 * tree / self.budget_bytes
        return MemoryReading(max(machine, budget), machine, tree, budget)


# ======================================================================================
# Memory isolation: a cgroup per job
# ======================================================================================
#
# With --isolation cgroup (`auto` picks it where it works), each job's child runs in a
# memory cgroup of its own below the supervisor's, with the job's limit as the group's hard
# limit. The kernel then caps the job's whole tree (the programs it starts, MAP_SHARED
# memory, page cache) the moment it gets there. The rlimit counts one process's private
# memory only, and the RSS poll looks every --poll: measured here (cgroup v1), a task
# mapping 600 MiB MAP_SHARED under a 200M limit took the supervisor's group 400-439 MiB
# above what it held before the poll killed it; in a group of its own the kernel killed it
# at 200 MiB, 0.18 s after it started. The rlimit and the poll stay, as a second line.
#
#   v2   OWN/                          the supervisor's group (systemd: the unit's, Delegate=yes)
#          litequeue-supervisor/       the supervisor itself: v2 lets only leaves hold processes
#          litequeue-PID-START-R/      this supervisor's jobs, a group per child: child-N/
#   v1   OWN/litequeue-PID-START-R/child-N/   (OWN: its group in the memory hierarchy)
#
# A group is removed once its child is reaped. What a supervisor killed with -9 left is
# removed by the next one that starts below the same group, after killing what still runs
# there (START, the process's start time, tells a dead supervisor from a reused pid).
#
# Known cost, left as SPEC.md has it ("the group is removed when the job ends"): a removed
# memory cgroup that still has page cache charged to it (a job's output file, most often)
# lingers in the kernel as a "dying" cgroup until that cache is reclaimed, holding some
# kernel memory and one of 65535 cgroup ids; measured here, 20 groups made and removed left
# 20 dying ones until their files were deleted. Emptying a group first (v1
# memory.force_empty) took 1-200 ms a group. Reusing idle groups would avoid both.

ISOLATION_MODES = ("auto", "cgroup", "rlimit")
KERNEL_OOM = "memory limit exceeded (kernel)"
KERNEL_OOM_OUTSIDE = ("killed by the kernel's OOM killer: memory ran out outside the job's "
                      "cgroup (the machine's, or a group's above the supervisor)")
CGROUP_PREFIX, SUPERVISOR_LEAF = "litequeue-", "litequeue-supervisor"
CGROUP_FILES = {          # version: (hard limit, swap limit, usage)
    1: ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.usage_in_bytes"),
    2: ("memory.max", "memory.swap.max", "memory.current"),
}


class CgroupUnusable(Exception):
    """Why job cgroups cannot be made here; its text is the reason, said once."""


def choose_isolation(requested, problem):
    """How hard jobs' limits are: ("cgroup" or "rlimit", why). Pure. requested: the
    --isolation asked for; problem: why job cgroups cannot be made here, or None. BadInput
    when cgroups were asked for and cannot be had."""
    if requested == "rlimit":
        return "rlimit", "--isolation rlimit"
    if problem is None:
        return "cgroup", None
    if requested == "cgroup":
        raise BadInput(f"--isolation cgroup: {problem}")
    return "rlimit", problem


class Isolation:
    """How hard a supervisor's job limits are: mode "cgroup" (with its JobCgroups) or
    "rlimit", and why, for the log at start."""

    __slots__ = ("mode", "why", "cgroups", "__weakref__")

    def __init__(self, mode, why, cgroups=None):
        self.mode, self.why, self.cgroups = mode, why, cgroups

    @classmethod
    def resolve(cls, requested):
        """A cgroup per job where it works and was not refused; BadInput when --isolation
        cgroup cannot be had. The groups go when the supervisor's run() ends, or when this
        object is collected (a test that only steps a Supervisor)."""
        cgroups = problem = None
        if requested != "rlimit":
            try:
                cgroups = JobCgroups.detect()
            except CgroupUnusable as exc:
                problem = str(exc)
        mode, why = choose_isolation(requested, problem)
        if cgroups is None:
            return cls(mode, why)
        import weakref
        isolation = cls(mode, repr(cgroups), cgroups)
        weakref.finalize(isolation, _close_in, os.getpid(), cgroups)
        return isolation


def _close_in(pid, cgroups):
    """Remove the groups, but only in the process that made them: a copy of it forked and
    exiting normally (an app that forks, a test) must not kill the live jobs."""
    if os.getpid() == pid:
        cgroups.close()


def _write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def _start_ticks(pid):
    """When a process started (clock ticks since boot), or None if it is gone: with its pid,
    it names one process for good, where a pid alone may be reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _own_cgroups(proc_cgroup, mountinfo):
    """{1: dir, 2: dir}: this process's own group in the v1 memory hierarchy and in the v2
    one, where each is mounted (read from mountinfo, so a non-standard mount point or a
    container's bind mount is found too)."""
    try:
        with open(proc_cgroup) as f:
            membership = [line.split(":", 2) for line in f.read().splitlines()]
        with open(mountinfo) as f:
            mounts = [line.split() for line in f.read().splitlines()]
    except OSError:
        return {}
    found = {}
    for fields in mounts:
        dash = fields.index("-")
        fstype, options = fields[dash + 1], fields[dash + 3].split(",")
        version = 2 if fstype == "cgroup2" else 1 if (
            fstype == "cgroup" and "memory" in options) else None
        if version is None:
            continue
        mount_root, mount_point = fields[3], fields[4]
        for _, controllers, path in membership:
            if (version == 2 and controllers == "") or (
                    version == 1 and "memory" in controllers.split(",")):
                relative = os.path.relpath(path, mount_root) if path.startswith(mount_root) \
                    else "."
                found[version] = os.path.normpath(os.path.join(mount_point, relative))
    return found


def set_group_limit(version, path, limit_bytes):
    """Make limit_bytes a group's hard limit, swap included (a job's limit is not a licence to
    swap). v1's memory+swap limit may never be below its memory limit, so the order of the
    two writes depends on whether the limit goes up or down."""
    limit_file, swap_file, _ = CGROUP_FILES[version]
    limit_path, swap_path = os.path.join(path, limit_file), os.path.join(path, swap_file)
    if version == 2:
        _write_file(limit_path, str(limit_bytes))
        with contextlib.suppress(FileNotFoundError):       # no swap controller: no swap
            _write_file(swap_path, "0")
        return
    writes = [(limit_path, limit_bytes)]
    if os.path.exists(swap_path):                           # only with swap accounting on
        writes.append((swap_path, limit_bytes))
    try:
        for target, value in writes:
            _write_file(target, str(value))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        for target, value in reversed(writes):              # raising it: memsw goes first
            _write_file(target, str(value))


def group_usage_bytes(version, path):
    try:
        return _read_int(os.path.join(path, CGROUP_FILES[version][2])) or 0
    except (OSError, ValueError):
        return 0


def group_oom_counts(version, path, hits=True):
    """(processes the kernel's OOM killer took in the group, times the group hit its own
    limit) since it was made; v1: 1 if its peak reached its limit (hits=False: 0, and two
    reads fewer)."""
    try:
        if version == 2:
            with open(os.path.join(path, "memory.events")) as f:
                events = dict(line.split() for line in f if line.strip())
            return int(events.get("oom_kill", 0)), int(events.get("oom", 0))
        # v1 has no count of limit hits to trust (failcnt stayed 0 here through an OOM kill
        # at the limit): whether the group's peak reached its limit.
        kills = _stat_value(os.path.join(path, "memory.oom_control"), "oom_kill")
        if not hits:
            return kills, 0
        peak = _read_int(os.path.join(path, "memory.max_usage_in_bytes")) or 0
        limit = _read_int(os.path.join(path, "memory.limit_in_bytes")) or 0
        return kills, int(peak >= limit - 16 * mmap_page_bytes())
    except (OSError, ValueError):
        return 0, 0


def oom_verdict(version, before, now_):
    """How the OOM killer took a process of a job between two (kills, hits) readings of its
    group: None (it did not), "limit" (at the group's own limit) or "outside" (memory ran
    out above the group). Pure. v2 counts the hits; v1 says whether the peak reached the
    limit, whenever that was."""
    if now_[0] <= before[0]:
        return None
    hit = now_[1] > before[1] if version == 2 else now_[1] > 0
    return "limit" if hit else "outside"


def mmap_page_bytes():
    return os.sysconf("SC_PAGE_SIZE")


def join_group(path):
    """Move the calling process into a group (what it starts from then on is born there)."""
    _write_file(os.path.join(path, "cgroup.procs"), str(os.getpid()))


class JobCgroups:
    """The mechanism of a cgroup per job: prepare this supervisor's directory of groups
    below its own group, make a group with a job's limit for each child, read the kernel's
    OOM kills in it, kill what is left in it, and remove it once the child is reaped. It
    decides nothing."""

    def __init__(self, version, own_dir, pid=None):
        self.version = version              # 1 or 2
        self.own_dir = own_dir              # the supervisor's own memory group
        pid = os.getpid() if pid is None else pid
        # Unique to this object: a process may run several supervisors in turn (tests do).
        self.root = os.path.join(own_dir, f"{CGROUP_PREFIX}{pid}-{_start_ticks(pid)}-"
                                          f"{random.randrange(1 << 32):08x}")
        self.made = 0                       # groups made (names them: child-N)
        self.leftover = []                  # groups whose processes were still exiting

    def __repr__(self):
        return f"cgroup v{self.version}, a group per job below {self.root}"

    @classmethod
    def detect(cls, proc_cgroup="/proc/self/cgroup", mountinfo="/proc/self/mountinfo"):
        """This process's job groups, prepared and tried (a group with a limit made and
        removed). CgroupUnusable says why not. What dead supervisors left is not
        touched here, but by remove_stale() once the supervisor serves."""
        own = _own_cgroups(proc_cgroup, mountinfo)
        v2 = own.get(2)
        if v2 is not None and os.path.basename(v2) == SUPERVISOR_LEAF:
            v2 = os.path.dirname(v2)        # moved there by an earlier supervisor of ours
        if v2 is not None and "memory" in _read_words(os.path.join(v2, "cgroup.controllers")):
            groups = cls(2, v2)
        elif own.get(1) is not None:
            groups = cls(1, own[1])
        elif v2 is not None:
            raise CgroupUnusable(f"the memory controller is not delegated to the supervisor's "
                                 f"cgroup {v2} (under systemd: Delegate=yes)")
        else:
            raise CgroupUnusable("no cgroup memory controller is mounted here")
        groups.prepare()
        return groups

    def prepare(self):
        try:
            if self.version == 2:
                self._delegate_below(self.own_dir, move_self=True)
            self._make_root()
            probe = self.create(64 * MiB)
            try:
                self._try_joining(probe)
            finally:
                self.release(probe)
        except OSError as exc:
            self.close()
            raise CgroupUnusable(self._explain(exc)) from None

    @staticmethod
    def _try_joining(path):
        """A process forked into the group, as each child will be: where groups can be made
        but processes not moved (v1 delegated with another owner for `tasks`), every job
        would fail; better to know at start. Raises OSError as the move did."""
        pid = os.fork()
        if pid == 0:                       # only system calls here: a forked copy
            try:
                join_group(path)
                os._exit(0)
            except OSError as exc:
                os._exit(min(exc.errno or 1, 255))
            finally:
                os._exit(1)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code:
            raise OSError(code, os.strerror(code), os.path.join(path, "cgroup.procs"))

    def _make_root(self):
        os.mkdir(self.root, 0o755)
        if self.version == 2:
            self._delegate_below(self.root)

    def _explain(self, exc):
        why = f"cannot make cgroups below {self.own_dir}: {exc.strerror}"
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"{why} (under systemd: Delegate=yes, and ProtectControlGroups off)"
        return why

    def _delegate_below(self, directory, move_self=False):
        """v2: turn the memory controller on for directory's children. v2 lets a group with
        controllers on for its children hold no processes itself, so (move_self) the
        supervisor first moves into a leaf of its own, if it is alone there."""
        if "memory" in _read_words(os.path.join(directory, "cgroup.subtree_control")):
            return
        if move_self:
            others = set(_read_words(os.path.join(directory, "cgroup.procs"))) - {
                str(os.getpid())}
            if others:
                raise CgroupUnusable(
                    f"the supervisor's cgroup {directory} holds other processes too "
                    f"({len(others)}): give it a cgroup of its own (under systemd: "
                    f"Delegate=yes)")
            leaf = os.path.join(directory, SUPERVISOR_LEAF)
            os.makedirs(leaf, 0o755, exist_ok=True)
            join_group(leaf)
        _write_file(os.path.join(directory, "cgroup.subtree_control"), "+memory")

    def create(self, limit_bytes):
        """A new group for a new child, with its first job's limit as the hard limit. A
        root removed from outside is made again."""
        self.made += 1
        path = os.path.join(self.root, f"child-{self.made}")
        try:
            os.mkdir(path, 0o755)
        except FileNotFoundError:
            self._make_root()
            os.mkdir(path, 0o755)
        try:
            if self.version == 2:
                # The kernel kills the whole job at the limit, not one process of it: a job
                # left half-killed would only fail later and less clearly.
                _write_file(os.path.join(path, "memory.oom.group"), "1")
            set_group_limit(self.version, path, limit_bytes)
        except OSError:
            with contextlib.suppress(OSError):
                os.rmdir(path)
            raise
        return path

    def oom_counts(self, path, hits=True):
        return group_oom_counts(self.version, path, hits)

    def kill_all(self, path):
        """SIGKILL everything in the group, programs that left the job's process group
        (a daemon's setsid) included."""
        if self.version == 2 and os.path.exists(os.path.join(path, "cgroup.kill")):
            with contextlib.suppress(OSError):
                _write_file(os.path.join(path, "cgroup.kill"), "1")
                return
        for pid in _read_words(os.path.join(path, "cgroup.procs")):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid), signal.SIGKILL)

    def release(self, path):
        """Remove the group of a reaped child. A process of it still exiting keeps it busy:
        killed, and the group is tried again later (retry_leftover)."""
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError:
            self.kill_all(path)
            if path not in self.leftover:
                self.leftover.append(path)
            return
        with contextlib.suppress(ValueError):
            self.leftover.remove(path)

    def retry_leftover(self):
        for path in list(self.leftover):
            self.release(path)

    def close(self, wait_s=1.0):
        """Remove every group left and our directory (the supervisor is leaving)."""
        self.leftover = []
        self._remove_tree(self.root, wait_s)

    def remove_stale(self):
        """Remove the directories of supervisors that are gone (killed with -9, or the
        power lost), after killing what still runs in their groups. One look, no waiting:
        a group whose processes are still exiting is tried again at the next call."""
        try:
            names = os.listdir(self.own_dir)
        except OSError:
            return
        for name in names:
            pid, _, started = name[len(CGROUP_PREFIX):].partition("-")
            started = started.partition("-")[0]
            if not (name.startswith(CGROUP_PREFIX) and pid.isdigit() and started.isdigit()):
                continue                   # the supervisors' leaf, or not ours
            if _start_ticks(int(pid)) == int(started):
                continue                   # its supervisor is alive
            path = os.path.join(self.own_dir, name)
            if self._remove_tree(path, 0.0):
                log.info("removed the job cgroups left by supervisor pid %s at %s", pid, path)

    def _remove_tree(self, path, wait_s):
        """Remove a directory of job groups, killing what is in them; True if it is gone."""
        give_up_tick = time.monotonic() + wait_s
        while True:
            try:
                groups = [entry.path for entry in os.scandir(path) if entry.is_dir()]
            except FileNotFoundError:
                return True
            except OSError:
                return False
            for group in groups:
                self.kill_all(group)
                with contextlib.suppress(OSError):
                    os.rmdir(group)
            with contextlib.suppress(OSError):
                os.rmdir(path)
                return True
            if time.monotonic() > give_up_tick:
                if wait_s:
                    log.warning("cgroup %s could not be removed yet: processes in it are "
                                "still exiting; the next supervisor removes it", path)
                return False
            time.sleep(0.01)               # SIGKILLed processes exit within milliseconds


def _read_words(path):
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:
        return []


# ======================================================================================
# The child: a fresh process per job, or a pooled one for a few jobs in turn
# ======================================================================================
#
# A child never touches the database: the supervisor is the only writer of the jobs it
# runs. It gets each job whole (row, checkpoint, memory limit) at fork or over its pipe, and
# reports back over another pipe, a line each, which the supervisor commits for all its
# children at once (group commit):
#
#   supervisor -> child   J {job}       run this job next (pooled: handed over, maybe ahead)
#                         A JOB         your last checkpoint of JOB is committed
#                         X             drop every job handed over that you have not started
#   child -> supervisor   S JOB TICK RSS CHARGED KILLS HITS  JOB's task starts (monotonic
#                                        tick, RSS, and of its cgroup: what it holds, OOM
#                                        kills and limit hits so far; 0s: no cgroup)
#                         P JOB [done, total]   progress (the newest per commit is kept)
#                         C JOB {state}        a checkpoint: the child waits for A JOB
#                         R JOB NEXT RUN_S {result}  JOB returned after RUN_S seconds;
#                                              NEXT 1: the child takes another
#                         F JOB KIND "error"   JOB raised (KIND: error or permanent)
#                         D [JOB, ...]         dropped on X, never started
#
# By default (--jobs-per-child 1) every job gets a fresh child, which exits after it: nothing
# a job leaves behind (memory, threads, module state) reaches the next one. With
# --jobs-per-child N a child that finished a job cleanly takes up to N - 1 more. Only a
# clean finish reuses a child: a failure, a stop request or growth past
# CHILD_GROWTH_LIMIT_BYTES ends it. Children are forked (see Supervisor.run for why); since
# a child no longer opens the file, what it inherits of SQLite's state is never used.

# RLIMIT_DATA, not RLIMIT_AS. Measured here under a 400 MiB limit: with RLIMIT_AS a child
# could not start its 7th thread while using 30 MiB (each thread reserves a 64 MiB glibc
# arena and an 8 MiB stack as address space); with RLIMIT_DATA 20 threads ran, and a 1 GiB
# allocation failed as cleanly (MemoryError within ~100 us, RSS unchanged) under either.
# RLIMIT_DATA counts private writable memory; it does not count MAP_SHARED anonymous memory,
# which the supervisor's RSS polling catches. The limit is set on top of what the child
# inherited from the supervisor at fork, so a large app import does not eat a job's budget.
MEMORY_RLIMIT = "RLIMIT_DATA"

# The pipe protocol's tags (see above).
SAY_STARTED, SAY_PROGRESS, SAY_CHECKPOINT, SAY_RESULT, SAY_FAILED, SAY_DROPPED = (
    b"S", b"P", b"C", b"R", b"F", b"D")
TELL_JOB, TELL_ACK, TELL_DROP = b"J", b"A", b"X"
FAILED_ERROR, FAILED_PERMANENT = "error", "permanent"     # the KIND of an F line


class ChildSpec:
    """What every child of a supervisor needs, set before the first fork."""

    __slots__ = ("parent_pid", "prctl", "tasks", "jobs_per_child", "output_dir", "oom_base",
                 "cgroup_version")

    def __init__(self, parent_pid, prctl, tasks, jobs_per_child, output_dir=None,
                 cgroup_version=None):
        self.parent_pid, self.prctl = parent_pid, prctl
        self.oom_base = _oom_score_adj()    # the supervisor's: every child's is above it
        self.tasks, self.jobs_per_child = tasks, jobs_per_child
        self.output_dir = output_dir    # None: output is discarded
        self.cgroup_version = cgroup_version    # None: no cgroup per job (rlimit only)


# How far above the supervisor's oom_score_adj a child's is raised, by its job's priority: if
# the kernel must kill, it takes low-priority work first and never prefers the supervisor.
OOM_SCORE_BY_PRIORITY = {CRITICAL: 100, HIGH: 200, NORMAL: 300, LOW: 400}


def _oom_score_adj():
    try:
        with open("/proc/self/oom_score_adj") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def _set_oom_score(spec, job):
    """Raise this child's oom_score_adj for its job's priority. Raising needs no privilege;
    a pooled child going on to a job of a higher priority may not lower it again without
    CAP_SYS_RESOURCE, and keeps the higher (more killable) score then."""
    score = min(1000, spec.oom_base + OOM_SCORE_BY_PRIORITY[job.priority_value])
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(score))
    except OSError:
        pass


def _die_with_parent(spec):
    """Ask the kernel to SIGKILL this child when the supervisor dies: no orphans holding memory."""
    if spec.prctl is not None:
        spec.prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
    if os.getppid() != spec.parent_pid:        # the parent died before prctl took effect
        os._exit(1)


def _data_bytes():
    """VmData of this process: the private memory it holds now."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _limit_memory(limit_bytes, *, hard, group=None):
    """Let the next job add at most limit_bytes of private memory to what this process holds
    now. A fresh child sets a hard limit. A reused child must be able to set the limit again
    for its next job, so it sets only the soft limit: a task could raise it again itself, and
    the supervisor's RSS polling still enforces the limit then. In a cgroup of its own, the
    group's hard limit becomes what the group holds now plus limit_bytes, likewise."""
    import resource
    which = getattr(resource, MEMORY_RLIMIT)
    ceiling = _data_bytes() + limit_bytes
    resource.setrlimit(which, (ceiling, ceiling if hard else resource.getrlimit(which)[1]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))       # no core dumps on an SD card
    if group is not None:
        group.limit(limit_bytes)


class _ChildGroup:
    """A child's own memory cgroup, as the child sees it. The supervisor made it with the
    first job's limit (a spare's: --memory-limit); for a job whose limit differs, the
    limit becomes what the group holds then plus the job's. Only then: each cgroup file
    operation costs ~18 us, and four a job cost 20% of --jobs-per-child 1000's throughput
    here; a pooled child that grew is replaced anyway (CHILD_GROWTH_LIMIT_BYTES)."""

    def __init__(self, version, path, limit_bytes):
        self.version, self.path = version, path
        self.limit_bytes = limit_bytes  # the job limit the group's limit was last set for
        self.base_bytes = 0             # what the group held then

    def limit(self, limit_bytes):
        if limit_bytes == self.limit_bytes:
            return
        base = group_usage_bytes(self.version, self.path)
        with contextlib.suppress(OSError):     # else the limit it was made with holds
            set_group_limit(self.version, self.path, base + limit_bytes)
            self.limit_bytes, self.base_bytes = limit_bytes, base

    def oom_killed(self, kills_before, hits_before):
        """Since those counts: None, "limit" or "outside" (see ChildPool.kernel_oom)."""
        kills, hits = group_oom_counts(self.version, self.path)
        return oom_verdict(self.version, (kills_before, hits_before), (kills, hits))


def _redirect_output(output_dir, job, streams):
    """Make fds 1 and 2 the job's output file (appended to, made 0600), so that print,
    tracebacks, logging to stderr and the programs the task starts all land there, in order;
    then write the attempt's marker line. Where the file cannot be opened (the directory
    is gone, refused, the disk full) the output goes to /dev/null and the job still runs.
    Returns why it could not be kept, or None."""
    streams.flush()                        # the last job's print()s go to its own file
    with contextlib.suppress(Exception):
        sys.stdout.flush()                 # what the supervisor's side left goes where it was
        sys.stderr.flush()
    problem = None
    try:
        if output_dir is None:
            raise OutputRefused("no output directory")
        if not check_output_dir(output_dir, create=False):
            raise FileNotFoundError(f"output directory {output_dir} is missing")
        fd = os.open(output_file_of(output_dir, job.id),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except (OSError, OutputRefused) as exc:
        problem = f"job output discarded: {exc}"
        fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    for target in (1, 2):
        os.dup2(fd, target)                # dup2 clears O_CLOEXEC: programs inherit 1 and 2
    os.close(fd)
    streams.bind()
    try:
        _write_all(1, attempt_marker(job, now()))
    except OSError as exc:                 # a full disk: the task will meet it too
        problem = problem or f"job output: {exc}"
    return problem


class _JobStreams:
    """A child's sys.stdout and sys.stderr over fds 1 and 2 (the job's output file).

    stdout is block-buffered (OUTPUT_BUFFER_BYTES): print() of 1 KiB lines one system call
    each ran at 0.11x a buffered write() loop. Everything else that writes to the same file
    flushes it first, so the file still reads in the order things happened: every write to
    sys.stderr (tracebacks, logging), ctx.emit/save/progress, the end of the task, and the
    start of any program the task runs. os.register_at_fork covers os.fork and
    multiprocessing; subprocess (fork_exec in C), os.system, os.posix_spawn and os.exec*
    do not run those hooks, so this child wraps them to flush first. They are patched in
    the job's own process only, never in the supervisor. What stays out of order: a task's
    own os.write(1, ...) after an unflushed print (flush sys.stdout first)."""

    def __init__(self):
        self.stdout = self.stderr = None
        os.register_at_fork(before=self.flush)
        import subprocess
        subprocess.Popen._execute_child = self._flushing_first(subprocess.Popen._execute_child)
        for name in ("system", "posix_spawn", "posix_spawnp", "execv", "execve"):
            if hasattr(os, name):           # os.exec[lv]p?e? all end in execv or execve
                setattr(os, name, self._flushing_first(getattr(os, name)))

    def _flushing_first(self, fn):
        def flushed_then(*args, **kwargs):
            self.flush()
            return fn(*args, **kwargs)
        return functools.wraps(fn)(flushed_then)

    def flush(self):
        if self.stdout is not None:
            with contextlib.suppress(Exception):
                self.stdout.flush()

    def bind(self):
        """Make sys.stdout and sys.stderr this child's streams over fds 1 and 2 again (a task
        may have replaced them). The same objects serve every job of a pooled child, so one
        a task kept (a logging handler's stream) still writes in order after the next dup2."""
        if self.stdout is None:
            raw = io.FileIO(1, "w", closefd=False)
            self.stdout = io.TextIOWrapper(io.BufferedWriter(raw, OUTPUT_BUFFER_BYTES),
                                           encoding="utf-8", errors="backslashreplace")
            self.stderr = _StderrAfterStdout(io.FileIO(2, "w", closefd=False),
                                             encoding="utf-8", errors="backslashreplace",
                                             write_through=True)
            self.stderr.before = self.flush
        sys.stdout, sys.stderr = self.stdout, self.stderr


class _StderrAfterStdout(io.TextIOWrapper):
    """Unbuffered stderr whose every write first flushes the job's buffered stdout."""

    def write(self, text):
        self.before()
        return super().write(text)

    def flush(self):
        self.before()
        return super().flush()


def _call_task(fn, ctx, payload):
    """Run a task. A dict payload becomes keyword arguments. A generator task checkpoints
    at every `yield state`, which is also a safe point to stop. An `async def` task (or
    async generator) runs on a fresh event loop (see _run_async)."""
    if isinstance(payload, dict):
        out = fn(ctx, **payload)
    elif payload is None:
        out = fn(ctx)
    else:
        out = fn(ctx, payload)
    if hasattr(out, "__await__") or hasattr(out, "__anext__"):
        return _run_async(out, ctx)
    if hasattr(out, "__next__") and hasattr(out, "send"):
        try:
            while True:
                ctx.save(next(out))
        except StopIteration as stop:
            return stop.value
    return out


def _run_async(out, ctx):
    """Run an awaitable or an async generator to its end on a fresh event loop; this child
    runs one job at a time, so the loop is the task's alone. ctx.save blocks the loop for its
    pipe round trip to the supervisor (a group commit, milliseconds), and the task's other
    coroutines pause with it: acceptable, as a save is a point where the task waits for its
    state to be durable, and one save at a time keeps the child's pipe protocol simple.
    A stop asked at ctx.save raises StopRequested, a BaseException: the loop's Task keeps it
    as the task's exception and asyncio.run raises it again as itself, after cancelling
    whatever else the task left running (checked on 3.11, and by the preemption test in
    tests/test_async_tasks.py), so the child exits stopped and the job is requeued. The
    supervisor's SIGUSR1 and systemd's SIGTERM interrupt the loop's select and run
    _ChildSignals.handle, so ctx.stopping turns True while the task awaits."""
    import asyncio
    if hasattr(out, "__anext__"):
        return asyncio.run(_checkpoint_async_yields(out, ctx))
    return asyncio.run(_awaited(out))


async def _awaited(awaitable):
    return await awaitable        # asyncio.run takes only a coroutine, not any awaitable


async def _checkpoint_async_yields(agen, ctx):
    """An async generator task checkpoints at every `yield state`, as a generator task does."""
    try:
        async for state in agen:
            ctx.save(state)
    finally:
        await agen.aclose()        # its own `finally` blocks run before the loop closes


class _ChildSignals:
    """A child's stop requests: SIGUSR1 from the supervisor, and SIGTERM, which systemd
    (KillMode=control-group) sends to every process of the service; either way the job
    stops at its next checkpoint, as it would for the supervisor, rather than die as a
    failure. A pooled child waiting for its next job has nothing to save and stops at once."""

    def __init__(self):
        self.asked, self.ctx, self.idle = False, None, False

    def handle(self, signum, frame):
        self.asked = True
        if self.ctx is not None:
            self.ctx.ask_stop()
        if self.idle:
            self.idle = False              # once: a second signal must not interrupt the exit
            raise StopRequested()


class _ParentLink:
    """The child's two pipes to its supervisor: lines out, lines in (see the protocol above).
    Jobs handed over ahead of time wait here until the child is free for them."""

    def __init__(self, to_parent, from_parent):
        import _thread
        self.to_parent, self.from_parent = to_parent, from_parent
        self.saying = _thread.allocate_lock()   # a task's threads may save and report at once
        self.pending = b""           # read, not yet a whole line
        self.handed = []             # jobs handed over, not started: (Job, memory limit)
        self.acked = set()           # job ids whose last checkpoint is committed

    def say(self, tag, *fields):
        line = b" ".join([tag, *(f if isinstance(f, bytes) else str(f).encode()
                                 for f in fields)]) + b"\n"
        with self.saying:
            view = memoryview(line)
            while view:                   # a 1 MiB result does not fit a pipe in one write
                view = view[os.write(self.to_parent, view):]

    def _read_line(self):
        """The next line from the supervisor, blocking; None at end of file."""
        while b"\n" not in self.pending:
            chunk = os.read(self.from_parent, 1 << 16)
            if not chunk:
                return None
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line

    def _take(self, line):
        tag, _, rest = line.partition(b" ")
        if tag == TELL_ACK:
            self.acked.add(int(rest))
        elif tag == TELL_JOB:
            order = json.loads(rest)
            self.handed.append((Job.from_fields(order["job"]), order["memory_limit_bytes"]))
        elif tag == TELL_DROP:
            dropped, self.handed = [job.id for job, _ in self.handed], []
            self.say(SAY_DROPPED, json.dumps(dropped).encode())

    def wait_ack(self, job_id):
        """Block until the supervisor says job_id's checkpoint is committed."""
        while job_id not in self.acked:
            line = self._read_line()
            if line is None:          # the supervisor is gone: nothing was confirmed
                os._exit(1)
            self._take(line)
        self.acked.discard(job_id)

    def next_job(self, signals):
        """The next job handed over: (Job, memory limit), waiting for one if need be; (None,
        None) when the supervisor lets this child go. A stop asked meanwhile ends it.
        Whatever is in the pipe already is read first, so an X sent after the jobs it
        drops is seen before the next of them starts."""
        self._read_waiting()
        while not self.handed:
            signals.idle = True
            if signals.asked:
                raise StopRequested()
            line = self._read_line()
            signals.idle = False
            if line is None:
                return None, None
            self._take(line)
            self._read_waiting()
        if signals.asked:
            raise StopRequested()
        return self.handed.pop(0)

    def _read_waiting(self):
        """Take every whole line the supervisor has written, without waiting for more."""
        import select
        while select.select([self.from_parent], [], [], 0)[0]:
            chunk = os.read(self.from_parent, 1 << 16)
            if not chunk:
                return
            self.pending += chunk
        while b"\n" in self.pending:
            line, self.pending = self.pending.split(b"\n", 1)
            self._take(line)


class _PipeReporter:
    """Where a task's checkpoints and progress go in a child: to the supervisor."""

    def __init__(self, link):
        self.link = link

    def save(self, job, text):
        self.link.say(SAY_CHECKPOINT, job.id, text.encode())
        self.link.wait_ack(job.id)

    def progress(self, job, done, total):
        self.link.say(SAY_PROGRESS, job.id, json.dumps([done, total]).encode())


def _child_main(spec, job, memory_limit_bytes, to_parent, from_parent, group=None):
    """Entry point of a child: run `job` (None: a spare, forked ahead: the first job handed
    over), then (pooled) the jobs handed over after it, up to spec.jobs_per_child, reporting
    each on to_parent. Any end of a job other than a clean return ends the child, which the
    supervisor then replaces. group: its memory cgroup, joined before any job's code runs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the supervisor's to handle
    signals = _ChildSignals()
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, signals.handle)
    _die_with_parent(spec)
    os.setpgid(0, 0)          # its own process group: a kill takes the programs it started too
    link = _ParentLink(to_parent, from_parent)
    unjoined = None
    if group is not None:
        try:
            join_group(group)
        except OSError as exc:             # the job it gets fails saying so: never unbounded
            unjoined = f"could not join its memory cgroup {group}: {exc}"
        group = _ChildGroup(spec.cgroup_version, group, memory_limit_bytes)
    pooled = spec.jobs_per_child > 1
    forked_bytes = process_rss_bytes(os.getpid()) or 0
    streams = _JobStreams()
    try:
        if job is None:
            job, memory_limit_bytes = link.next_job(signals)
            if job is None:
                return
        if unjoined is not None:
            link.say(SAY_FAILED, job.id, FAILED_ERROR, json.dumps(unjoined).encode())
            return
        _limit_memory(memory_limit_bytes, hard=not pooled, group=group)
        for number in range(1, spec.jobs_per_child + 1):
            started_tick = time.monotonic()
            returned, text = _run_job(job, spec, link, signals, memory_limit_bytes, streams,
                                      group)
            if not returned:
                return
            run_s = time.monotonic() - started_tick
            another = (pooled and number < spec.jobs_per_child and not signals.asked
                       and _fit_for_another(forked_bytes))
            link.say(SAY_RESULT, job.id, int(another), f"{run_s:.6f}", text.encode())
            if not another:
                return
            job, memory_limit_bytes = link.next_job(signals)
            if job is None:
                return
            _limit_memory(memory_limit_bytes, hard=False, group=group)
    except StopRequested:
        sys.exit(EXIT_CHILD_STOPPED)


def _run_job(job, spec, link, signals, memory_limit_bytes, streams, group=None):
    """Run one job's task. Returns (True, result as JSON) when it returned; (False, None)
    when it raised, after saying so."""
    import traceback
    output_problem = _redirect_output(spec.output_dir, job, streams)
    _set_oom_score(spec, job)
    ctx = signals.ctx = Context(None, job, None, reporter=_PipeReporter(link))
    if signals.asked:
        ctx.ask_stop()
    # Of its cgroup: the base its limit stands on (the RSS poll's second line measures from
    # it) and the OOM kills so far, so that only kills during this job are its own. (v1's
    # "hits" are read when a kill is seen; v2's come with the kills.)
    charged, kills, hits = 0, 0, 0
    if group is not None:
        charged = group.base_bytes
        kills, hits = group_oom_counts(group.version, group.path, hits=group.version == 2)
    link.say(SAY_STARTED, job.id, repr(time.monotonic()), process_rss_bytes(os.getpid()) or 0,
             charged, kills, hits)
    kind = FAILED_ERROR
    try:
        result = _call_task(spec.tasks[job.task].fn, ctx, job.payload)
        try:
            return True, dumps_json(result, "result")
        except BadPayload as exc:      # says which: not JSON, or JSON too large to store
            error = f"task returned a result that cannot be stored: {exc}"
    except Permanent as exc:
        kind, error = FAILED_PERMANENT, f"permanent failure: {exc}"
    except MemoryError:
        error = (f"memory limit exceeded: MemoryError under the "
                 f"{format_bytes(memory_limit_bytes)} limit\n{traceback.format_exc()}")
    except Exception:
        error = traceback.format_exc()
    finally:
        signals.ctx = None
        streams.flush()                     # before the traceback, and before R or F is said
    try:                                    # the output reads in order, its end included
        _write_all(2, f"{error.rstrip()}\n".encode("utf-8", "backslashreplace"))
    except OSError as exc:                  # a full disk, most often: the error says so
        name = errno.errorcode.get(exc.errno, exc.errno)
        output_problem = output_problem or f"job output not written: {name}: {exc.strerror}"
    if output_problem:
        error = f"{error.rstrip()}\n({output_problem})"
    if group is not None:
        # A program of the job was OOM-killed in its group, and the job failed of it
        killed = group.oom_killed(kills, hits)
        if killed == "limit":
            error = f"{KERNEL_OOM}: the kernel killed a process of the job\n{error}"
        elif killed == "outside":
            error = f"{KERNEL_OOM_OUTSIDE}: a process of the job\n{error}"
    link.say(SAY_FAILED, job.id, kind, json.dumps(_clipped(error.rstrip())).encode())
    return False, None


def _clipped(error, limit=MAX_ERROR_CHARS):
    """An error's text at most `limit` characters: its start and its end (a traceback's
    last lines say what went wrong)."""
    if len(error) <= limit:
        return error
    head = limit // 8
    return f"{error[:head]}\n... ({len(error) - limit} characters left out) ...\n{error[-(limit - head):]}"


def _fit_for_another(forked_bytes):
    """May this child run another job? Not if it grew past the threshold since its fork, or
    the job left a thread or a process running (it would run on into the next job)."""
    grown = (process_rss_bytes(os.getpid()) or 0) - forked_bytes
    threading = sys.modules.get("threading")
    return (grown <= CHILD_GROWTH_LIMIT_BYTES and len(process_tree(os.getpid())) == 1
            and (threading is None or threading.active_count() == 1))


# ======================================================================================
# Built-in tasks
# ======================================================================================

def _heartbeat(ctx):
    """Proof of life: status shows the age of the last one that finished."""
    return {"at": now()}


def _echo(ctx, **payload):
    """Return the payload."""
    return payload


def _sleep(ctx, seconds=1.0):
    """Sleep, stopping early at a safe point if asked; resumes with the time left."""
    deadline = time.monotonic() + float((ctx.checkpoint or {}).get("left_s", seconds))
    while (left_s := deadline - time.monotonic()) > 0:
        if ctx.stopping:
            ctx.save({"left_s": left_s})      # does not return: the job stops here
        time.sleep(min(0.05, left_s))
    return {"slept": seconds}


def _hog(ctx, mb=100, seconds=5.0):
    """Hold `mb` MiB of real, touched memory for `seconds` (to show the memory governor)."""
    block = bytearray(b"\x01") * (int(mb) * MiB)     # every page written: resident, not lazy
    time.sleep(float(seconds))
    return {"mb": mb, "held": len(block) // MiB}


def _chunked(ctx, chunks=10, chunk_s=0.2):
    """Sum 0..chunks-1 in steps, checkpointing after each: resumes where it was stopped."""
    state = ctx.checkpoint or {"i": 0, "sum": 0}
    while state["i"] < chunks:
        time.sleep(float(chunk_s))
        state = {"i": state["i"] + 1, "sum": state["sum"] + state["i"]}
        ctx.progress(state["i"], chunks)
        ctx.save(state)
    return {"sum": state["sum"], "chunks": chunks}


def _fail(ctx, message="failed on purpose"):
    """Raise, to see retries, dead jobs and the breaker."""
    raise RuntimeError(message)


BUILTIN_TASK_DEFAULTS = {
    "heartbeat": TaskDefaults("heartbeat", LOW, max_attempts=1, ttl_s=300, shed=True,
                              unique_task=True),
}
DEMO_TASKS = {
    "echo": (_echo, TaskDefaults("echo")),
    "sleep": (_sleep, TaskDefaults("sleep")),
    "hog": (_hog, TaskDefaults("hog")),
    "chunked": (_chunked, TaskDefaults("chunked", LOW)),
    "fail": (_fail, TaskDefaults("fail", max_attempts=1)),
}


def builtin_catalogue():
    """(fn, defaults) of the tasks a new file's catalogue lists: `heartbeat` alone. The demo
    tasks are stored by a supervisor that serves them (`serve` without --app) when it
    registers: listed in every file, `enqueue echo` to an app's file was never warned about."""
    return [(_heartbeat, BUILTIN_TASK_DEFAULTS["heartbeat"])]


def builtin_tasks(queue, demos=False):
    """{name: Task} of the built-in tasks, bound to queue. With demos, they are declared in
    its file's catalogue too, as @queue.task declares a task (`serve` without --app)."""
    tasks = {"heartbeat": Task(queue, _heartbeat, BUILTIN_TASK_DEFAULTS["heartbeat"])}
    if demos:
        tasks.update({name: Task(queue, fn, defaults) for name, (fn, defaults) in DEMO_TASKS.items()})
        queue.store_catalogue([defaults for _, defaults in DEMO_TASKS.values()])
    return tasks


# ======================================================================================
# Supervisor: its options, the decisions it takes (pure), the child pool, and the loop
# ======================================================================================

# Why a run is stopped, as the supervisor decides it and the job's events record it.
STOP_PREEMPT, STOP_EMERGENCY, STOP_SHUTDOWN, STOP_CANCEL = (
    "preempt", "emergency", "shutdown", "cancel")
STOP_TIMEOUT, STOP_MEMORY, STOP_START, STOP_BROKEN, STOP_OUTPUT = (
    "timeout", "memory", "start", "broken", "output")
STOPPING_FOR_MEMORY = (STOP_PREEMPT, STOP_EMERGENCY)
FAILING_STOPS = (STOP_TIMEOUT, STOP_MEMORY, STOP_START, STOP_BROKEN, STOP_OUTPUT)  # its own fault
# A pooled child whose jobs are short is handed its next jobs ahead of time, so it goes from
# one to the next without waiting for the supervisor's commit: as many as its last job's
# run time says fit in AHEAD_WORK_S, at most AHEAD_JOBS. Only jobs of tasks whose last job
# here ran under AHEAD_WORK_S are handed ahead, so nothing waits long behind another job.
AHEAD_JOBS, AHEAD_WORK_S = 16, 0.02


class SupervisorOptions:
    """A supervisor's options, checked once (BadInput otherwise) and in units: `serve`
    builds them before it opens the file, and the Supervisor uses them as they are."""

    __slots__ = ("slots", "jobs_per_child", "memory_limit_bytes", "memory_budget_bytes",
                 "poll_s", "thresholds", "margin", "hold_s", "grace_s", "keep_s", "burst",
                 "notice_s", "start_deadline_s", "output_limit_bytes", "isolation", "age_s",
                 "psi")

    def __init__(self, slots=2, memory_limit="400M", memory_budget=None, poll=0.25,
                 thresholds=(70, 85, 95), margin=5, hold=10, grace=10, keep=None,
                 jobs_per_child=1, burst=False, notice=0.01, start_deadline=CHILD_START_DEADLINE_S,
                 output_limit=DEFAULT_OUTPUT_LIMIT, isolation="auto", age=DEFAULT_AGE_S,
                 psi=True):
        self.slots = parse_positive_int(slots, "--slots")
        self.jobs_per_child = parse_positive_int(jobs_per_child, "--jobs-per-child")
        self.memory_limit_bytes = parse_memory_size(memory_limit, "--memory-limit")
        self.memory_budget_bytes = (None if memory_budget is None
                                    else parse_memory_size(memory_budget, "--memory-budget"))
        self.poll_s = parse_duration(poll, "--poll", allow_zero=False)
        tracker = LevelTracker(thresholds, margin, parse_duration(hold, "--hold"))
        self.thresholds, self.margin, self.hold_s = tracker.thresholds, tracker.margin, tracker.hold_s
        self.grace_s = parse_duration(grace, "--grace")
        self.keep_s = None if keep is None else parse_duration(keep, "--keep")
        self.burst = bool(burst)
        self.notice_s = parse_duration(notice, "notice", allow_zero=False)
        self.start_deadline_s = parse_duration(start_deadline, "start_deadline", allow_zero=False)
        self.output_limit_bytes = parse_size(output_limit, "--output-limit")
        if isolation not in ISOLATION_MODES:
            raise BadInput(f"--isolation must be one of {', '.join(ISOLATION_MODES)}, "
                           f"not {isolation!r}")
        self.isolation = isolation
        self.age_s = parse_duration(age, "--age")          # 0: no aging
        self.psi = bool(psi)

    def level_tracker(self):
        return LevelTracker(self.thresholds, self.margin, self.hold_s)

    def memory_probe(self, probe=None):
        """The probe to read pressure with (a new MemoryProbe, or the one given), measuring
        against the budget: a probe passed in does not silently ignore --memory-budget."""
        probe = probe or MemoryProbe()
        budget = self.memory_budget_bytes
        if budget is not None:
            if getattr(probe, "budget_bytes", None) not in (None, budget):
                raise BadInput(f"--memory-budget {format_bytes(budget)} and the probe's budget "
                               f"{format_bytes(probe.budget_bytes)} disagree")
            probe.budget_bytes = budget
        return probe


# -- decisions: pure functions of plain values, each tested alone -----------------------

def claimable_priorities(level, stopping):
    """The priorities a supervisor may start now: those its memory level lets start, none
    once it is stopping."""
    return () if stopping else START_PRIORITIES[level]


def aged_priority(priority, waited_s, age_s):
    """The priority a job is claimed at after waiting `waited_s` past its due time: one
    better for each whole `age_s` waited, never better than high (critical stays reserved
    for work declared critical). `age_s` None or 0: no aging. Only the claim order uses it:
    memory levels shed and preempt by the job's own priority."""
    if not age_s or priority <= HIGH or waited_s < age_s:
        return priority
    return max(HIGH, priority - int(waited_s // age_s))


class RunFacts:
    """What the limit and ending decisions need to know of one run."""

    __slots__ = ("own_bytes", "limit_bytes", "started", "age_s", "timeout_s", "stop_reason",
                 "detail", "kill_at_tick", "killed", "output_bytes", "output_limit_bytes")

    def __init__(self, own_bytes=0, limit_bytes=DEFAULT_MEMORY_LIMIT_BYTES, started=True,
                 age_s=0.0, timeout_s=None, stop_reason=None, detail=None, kill_at_tick=None,
                 killed=False, output_bytes=0, output_limit_bytes=None):
        self.own_bytes, self.limit_bytes, self.started = own_bytes, limit_bytes, started
        self.age_s, self.timeout_s = age_s, timeout_s
        self.stop_reason, self.detail = stop_reason, detail
        self.kill_at_tick, self.killed = kill_at_tick, killed
        self.output_bytes, self.output_limit_bytes = output_bytes, output_limit_bytes


class Verdict:
    """A stop that a run's limits call for: SIGKILL now ("kill"), or SIGTERM now and SIGKILL
    at kill_at_tick ("term"); with the reason and the words the job's error will carry."""

    __slots__ = ("action", "reason", "detail", "kill_at_tick")

    def __init__(self, action, reason, detail, kill_at_tick=None):
        self.action, self.reason, self.detail = action, reason, detail
        self.kill_at_tick = kill_at_tick

    def __repr__(self):
        return f"Verdict({self.action}, {self.reason}, {self.detail!r}, {self.kill_at_tick})"


def limits_verdict(run, tick, *, grace_s, start_deadline_s):
    """What a run's limits call for at `tick`, or None. Its memory first (over the limit:
    killed, and that is why it ends, unless it was being cancelled), then a child that never
    started its task (hung after fork), then its timeout and its output limit (SIGTERM lets
    the task stop at a checkpoint, kept for its retry; SIGKILL after a short grace), then a
    stop asked earlier whose grace ran out (killed, keeping the reason it was asked for)."""
    if run.killed:
        return None
    if run.own_bytes > run.limit_bytes:
        reason = STOP_CANCEL if run.stop_reason == STOP_CANCEL else STOP_MEMORY
        return Verdict("kill", reason, f"memory limit exceeded: "
                       f"{format_bytes(run.own_bytes)} > {format_bytes(run.limit_bytes)}")
    if not run.started and run.age_s > start_deadline_s:
        return Verdict("kill", STOP_START, f"the child did not start within "
                       f"{start_deadline_s:g}s: it hung after fork (another thread of the "
                       f"supervisor held a lock then; an --app that starts threads at import "
                       f"does this)")
    if run.timeout_s is not None and run.stop_reason is None and run.age_s > run.timeout_s:
        return Verdict("term", STOP_TIMEOUT, f"timeout after {run.timeout_s:g}s",
                       tick + min(grace_s, 5.0))
    if (run.output_limit_bytes is not None and run.stop_reason is None
            and run.output_bytes > run.output_limit_bytes):
        return Verdict("term", STOP_OUTPUT, f"output limit exceeded "
                       f"({run.output_limit_bytes / MiB:g} MiB)", tick + min(grace_s, 5.0))
    if run.kill_at_tick is not None and tick >= run.kill_at_tick:
        return Verdict("kill", run.stop_reason, f"{run.detail}: no checkpoint within the grace")
    return None


def shutdown_stops(runs, *, stop_now):
    """At shutdown, for each (job_id, stop_reason) running: "kill" (a second signal: now),
    "ask" (the first: stop at the next checkpoint) or None (already being stopped)."""
    if stop_now:
        return {job_id: "kill" for job_id, _ in runs}
    return {job_id: "ask" if reason in (None, STOP_PREEMPT) else None for job_id, reason in runs}


class Ending:
    """What an ended run becomes, for the queue to record: done (with its result), failed
    (retried while attempts remain, or dead), requeued (charged an attempt or not) or
    cancelled."""

    __slots__ = ("state", "reason", "result", "retryable", "breaker_failure", "charge",
                 "preempted")

    def __init__(self, state, reason=None, *, result=None, retryable=True,
                 breaker_failure=True, charge=False, preempted=False):
        self.state, self.reason, self.result = state, reason, result
        self.retryable, self.breaker_failure = retryable, breaker_failure
        self.charge, self.preempted = charge, preempted

    def __repr__(self):
        return (f"Ending({self.state}, {self.reason!r}, retryable={self.retryable}, "
                f"breaker_failure={self.breaker_failure}, charge={self.charge})")

    def __eq__(self, other):
        return isinstance(other, Ending) and all(
            getattr(self, name) == getattr(other, name) for name in self.__slots__)


def run_ending(reported, *, current, stop_reason, detail, exit_code, saved, started=True):
    """What a run that ended becomes. Pure.

    reported: what its child said of it: ("done", result JSON), ("failed", kind, error) or
    None. current: it was its child's job when the child ended (not one handed over ahead
    and never started). saved: it saved a checkpoint in this run (not an earlier one).
    started: its task began (a memory stop before that costs no attempt)."""
    if reported is not None and reported[0] == DONE:
        return Ending(DONE, result=reported[1])          # it returned: done, whatever was asked
    if stop_reason == STOP_CANCEL:
        return Ending(CANCELLED, "cancelled")             # never a failure, however it ended
    if reported is not None:
        permanent = reported[1] == FAILED_PERMANENT
        return Ending(ENDING_FAILED, reported[2], retryable=not permanent,
                      breaker_failure=not permanent)
    if not current:
        return Ending(ENDING_REQUEUED, detail or "handed back before it started")
    if stop_reason is None and exit_code in (EXIT_CHILD_STOPPED, -signal.SIGTERM):
        # Stopped by a signal from outside (systemd's SIGTERM to the whole group reached the
        # child before our own stop request): a shutdown, not a failure of the job.
        stop_reason, detail = STOP_SHUTDOWN, "stopped by SIGTERM from outside"
    if stop_reason in (*STOPPING_FOR_MEMORY, STOP_SHUTDOWN):
        charge = stop_reason in STOPPING_FOR_MEMORY and started and not saved
        why = detail if not charge else (
            f"memory pressure: {detail}, stopped before saving a checkpoint")
        return Ending(ENDING_REQUEUED, why, charge=charge,
                      preempted=stop_reason in STOPPING_FOR_MEMORY)
    if stop_reason in FAILING_STOPS:
        return Ending(ENDING_FAILED, detail)
    if exit_code is not None and exit_code < 0:
        return Ending(ENDING_FAILED, f"killed by signal {-exit_code}")
    return Ending(ENDING_FAILED, f"child exited with code {exit_code} without recording a result")


def ahead_wanted(last_run_s, handed_ahead, capacity_left):
    """How many more jobs to hand a pooled child ahead of time: what fits in AHEAD_WORK_S at
    the pace of its last job, at most AHEAD_JOBS, never past its --jobs-per-child."""
    if last_run_s is None or last_run_s >= AHEAD_WORK_S:
        return 0
    fits = int(AHEAD_WORK_S / max(last_run_s, AHEAD_WORK_S / AHEAD_JOBS))
    return max(0, min(fits, capacity_left) - handed_ahead)


# -- the mechanism: children, their pipes, and what they say ---------------------------

class _Run:
    """A job handed to a child, as the supervisor tracks it until its ending is committed."""

    __slots__ = ("job", "child", "memory_limit_bytes", "handed_tick", "started_tick",
                 "baseline_bytes", "stop_reason", "detail", "kill_at_tick", "killed",
                 "rss_bytes", "saved", "checkpoint", "ack_owed", "progress", "reported",
                 "ending", "lease_lost", "forked", "cancel_asked", "output_bytes",
                 "charged_bytes", "charged_baseline_bytes", "oom_base")

    def __init__(self, job, child, memory_limit_bytes, handed_tick, baseline_bytes=0):
        self.job, self.child, self.memory_limit_bytes = job, child, memory_limit_bytes
        self.handed_tick = handed_tick
        self.started_tick = None    # monotonic, from the child's S line: timeouts count from it
        # What the child held when it started the job (its fork, or earlier jobs): counted by
        # the rlimit's base, not against the job.
        self.baseline_bytes = baseline_bytes
        self.stop_reason = None     # one of the STOP_* reasons, once a stop is decided
        self.detail = None          # the figures behind a stop, for the job's error
        self.kill_at_tick = None    # SIGKILL then if still alive
        self.killed = False         # SIGKILL sent
        self.rss_bytes = 0
        self.saved = False          # a checkpoint was reported in this run
        self.checkpoint = None      # the newest checkpoint (JSON) not yet committed
        self.ack_owed = False       # the child waits to hear that it is committed
        self.progress = None        # the newest progress not yet committed
        self.reported = None        # ("done", result) or ("failed", kind, error)
        self.ending = None          # decided: an Ending to commit
        self.lease_lost = False     # the file says another owner has it now
        self.forked = False         # its child was forked for it (not handed it later)
        self.cancel_asked = False   # someone asked to cancel it: stopped once it is current
        self.output_bytes = 0       # its size at the last memory poll
        # In a cgroup of its own, the job's memory is what the kernel charges its group
        # (exact: shared pages once), measured like RSS from what it held at start.
        self.charged_bytes = None   # the group's usage at the last poll; None: no group
        self.charged_baseline_bytes = 0
        self.oom_base = None        # its group's (OOM kills, limit hits) when it started

    def facts(self, tick, output_limit_bytes=None):
        started_tick = self.started_tick if self.started_tick is not None else self.handed_tick
        own_bytes = (self.rss_bytes - self.baseline_bytes if self.charged_bytes is None
                     else self.charged_bytes - self.charged_baseline_bytes)
        return RunFacts(own_bytes, self.memory_limit_bytes,
                        self.started_tick is not None, tick - started_tick, self.job.timeout_s,
                        self.stop_reason, self.detail, self.kill_at_tick, self.killed,
                        self.output_bytes, output_limit_bytes)

    def view(self):
        return RunningView(self.job.id, self.job.priority_value, self.rss_bytes,
                           self.started_tick or self.handed_tick, self.stop_reason,
                           self.job.preemptions)


class _Child:
    """A child process as the pool tracks it, across the jobs it runs."""

    __slots__ = ("process", "from_child", "to_child", "runs", "partial", "outbox", "eof",
                 "reaped", "idle_since_tick", "handed", "last_run_s", "dropping", "done",
                 "retired", "retired_tick", "group", "oom_base", "oom_killed")

    def __init__(self, process, from_child, to_child, group=None):
        self.process = process
        self.group = group              # its memory cgroup (None: rlimit only)
        self.oom_base = (0, 0)          # its group's (OOM kills, limit hits) when handed over
        self.oom_killed = None          # at its reaping: how the OOM killer took its job
        self.from_child = from_child    # read end of what it says, a line each
        self.to_child = to_child        # write end of what we tell it
        self.runs = []                  # handed over, not finished; runs[0] is its job now
        self.partial = b""              # the start of a line not yet read whole
        self.outbox = b""               # told, not yet written (its pipe was full)
        self.eof = False                # its end of the pipe is closed
        self.reaped = False             # waited for: its pid may be reused from then on
        self.idle_since_tick = None     # waiting for a job since then
        self.handed = 0                 # jobs handed to it in all
        self.last_run_s = None          # how long its last job ran
        self.dropping = False           # told X; its D answer is awaited
        self.done = False               # said it takes no more jobs
        self.retired = False            # let go: SIGTERM sent
        self.retired_tick = None        # when

    @property
    def pid(self):
        return self.process.pid

    @property
    def current(self):
        return self.runs[0] if self.runs else None


def _pass_on_stop(finished, following):
    """A child asked to stop (or killed) for `finished` had gone on to `following` when we
    learned that it finished: the stop reaches `following` too. A stop for memory pressure
    or a shutdown stays what it was; a stop for the finished job's own fault (its memory,
    its timeout, its cancel) is not the following job's: a shutdown for it."""
    keeps = finished.stop_reason in (*STOPPING_FOR_MEMORY, STOP_SHUTDOWN)
    following.stop_reason = finished.stop_reason if keeps else STOP_SHUTDOWN
    following.detail = (f"its child was stopped for job {finished.job.id}"
                        f" ({finished.detail or finished.stop_reason})")
    following.killed, following.kill_at_tick = finished.killed, finished.kill_at_tick


class ChildPool:
    """The mechanism: fork children, hand them jobs, read what they say, acknowledge, reap,
    retire and kill. It decides nothing: the Supervisor tells it what to do."""

    def __init__(self, spec, mp, cgroups=None):
        self.spec, self.mp = spec, mp
        self.cgroups = cgroups          # JobCgroups: a group per child; None: rlimit only
        self.children = []              # not yet reaped
        self.read_tick = 0.0            # when a child last said something
        self.forked = 0                 # children forked in all (names their groups)

    def fork(self, run, tick):
        """A new child for run's job (in a new cgroup with the job's limit, where used)."""
        child = self._start(run.job, run.memory_limit_bytes, f"litequeue-job-{run.job.id}")
        child.handed, child.runs, run.child, run.forked = 1, [run], child, True
        run.handed_tick = time.monotonic()
        return child

    def fork_spare(self, limit_bytes):
        """A child forked ahead of its job, already in its cgroup, waiting to be handed one:
        moving a process into a v1 cgroup waits for an RCU grace period (8.5 ms measured
        here), which a spare has paid before its job comes."""
        child = self._start(None, limit_bytes, "litequeue-spare")
        child.idle_since_tick = time.monotonic()
        return child

    def _start(self, job, limit_bytes, name):
        group, oom_base = None, (0, 0)
        if self.cgroups is not None:
            group = self.cgroups.create(limit_bytes)
            oom_base = self.cgroups.oom_counts(group, hits=self.cgroups.version == 2)
        from_child, to_parent = os.pipe()
        from_parent, to_child = os.pipe()
        process = self.mp.Process(target=_child_main, name=name,
                                  args=(self.spec, job, limit_bytes, to_parent, from_parent,
                                        group))
        try:
            process.start()
        except BaseException:
            os.close(from_child)
            os.close(to_child)
            if group is not None:
                self.cgroups.release(group)
            raise
        finally:
            os.close(to_parent)
            os.close(from_parent)
        os.set_blocking(from_child, False)
        os.set_blocking(to_child, False)
        with contextlib.suppress(OSError):        # also set in the child: whichever runs first
            os.setpgid(process.pid, process.pid)
        self.forked += 1
        child = _Child(process, from_child, to_child, group)
        child.oom_base = oom_base
        self.children.append(child)
        return child

    def hand(self, child, run):
        """Give run's job to a pooled child: now if it waits, else after its current ones."""
        order = {"job": run.job.to_fields(), "memory_limit_bytes": run.memory_limit_bytes}
        self._tell(child, TELL_JOB + b" " + json.dumps(order).encode())
        child.runs.append(run)
        child.handed += 1
        child.idle_since_tick = None
        run.child, run.handed_tick = child, time.monotonic()

    def ack(self, run):
        self._tell(run.child, TELL_ACK + b" " + str(run.job.id).encode())

    def drop_ahead(self, child):
        """Ask a child to give back the jobs it was handed and has not started."""
        if not child.dropping and len(child.runs) > 1:
            child.dropping = True
            self._tell(child, TELL_DROP)

    def _tell(self, child, line):
        child.outbox += line + b"\n"
        self.flush(child)

    def flush(self, child):
        while child.outbox and not child.reaped:
            try:
                child.outbox = child.outbox[os.write(child.to_child, child.outbox):]
            except BlockingIOError:
                return                  # its pipe is full: the rest goes at a later step
            except (BrokenPipeError, OSError):
                child.outbox = b""      # it is gone; reaping settles what it held

    def flush_all(self):
        for child in self.children:
            if child.outbox:
                self.flush(child)

    def read(self):
        """What children said since the last read, applied to their runs in order. Returns
        [(run, current)] of the runs that ended there: reported done or failed (current:
        it was its child's job), or given back unstarted on X."""
        ended = []
        for child in list(self.children):
            data = self._read_all(child)
            if data:
                self.read_tick = time.monotonic()
                *lines, child.partial = (child.partial + data).split(b"\n")
                for line in lines:
                    try:
                        ended += self._apply(child, line)
                    except (ValueError, TypeError, KeyError, IndexError) as exc:
                        self._unreadable(child, line, exc)
                        break
        return ended

    def _unreadable(self, child, line, exc):
        """A line that is not the protocol (a task wrote to the pipe it inherited): the
        child cannot be trusted to report; it is killed, and its job fails saying why."""
        log.error("child %d said something unreadable (%s: %.80r); killing it",
                  child.pid, type(exc).__name__, line)
        run = child.current
        if run is not None and not run.killed:
            run.stop_reason, run.kill_at_tick, run.killed = STOP_BROKEN, None, True
            run.detail = f"its child's report could not be read ({type(exc).__name__}: {exc})"
        child.eof = True
        self.signal(child, signal.SIGKILL)

    @staticmethod
    def _apply(child, line):
        """One line a child said (see the child section), applied to its run."""
        tag, _, rest = line.partition(b" ")
        if tag == SAY_DROPPED:
            dropped = set(json.loads(rest))
            child.dropping = False
            gone = [run for run in child.runs[1:] if run.job.id in dropped]
            child.runs = [run for run in child.runs if run not in gone]
            return [(run, False) for run in gone]
        job_id, _, rest = rest.partition(b" ")
        run = next((run for run in child.runs if run.job.id == int(job_id)), None)
        if run is None:
            return []
        if tag == SAY_STARTED:
            started_tick, rss_bytes, charged_bytes, kills, hits = rest.split()
            run.started_tick, run.baseline_bytes = float(started_tick), int(rss_bytes)
            run.charged_baseline_bytes, run.oom_base = int(charged_bytes), (int(kills), int(hits))
        elif tag == SAY_PROGRESS:
            run.progress = json.loads(rest)
        elif tag == SAY_CHECKPOINT:
            run.checkpoint, run.saved, run.ack_owed = rest.decode(), True, True
        elif tag == SAY_RESULT:
            another, run_s, result = rest.split(b" ", 2)
            run.reported, child.done = (DONE, result.decode()), another != b"1"
            child.last_run_s = float(run_s)
        elif tag == SAY_FAILED:
            kind, _, error = rest.partition(b" ")
            run.reported, child.done = (ENDING_FAILED, kind.decode(), json.loads(error)), True
        if run.reported is None:
            return []
        tick = time.monotonic()
        child.runs.remove(run)
        if tag == SAY_FAILED:
            child.last_run_s = tick - (run.started_tick or run.handed_tick)
        if not child.runs and not child.done:
            child.idle_since_tick = tick
        if child.runs:
            following = child.runs[0]
            following.handed_tick = tick          # its start deadline counts from now
            if run.stop_reason is not None or run.killed:
                _pass_on_stop(run, following)
        return [(run, True)]

    @staticmethod
    def _read_all(child):
        """All that is in a child's pipe now. An end of file while it lives (a task closed the
        fds it inherited) marks the pipe finished, so the loop does not wake on it forever."""
        data = b""
        while not child.eof:
            try:
                chunk = os.read(child.from_child, 1 << 16)
            except BlockingIOError:
                break
            child.eof = not chunk
            data += chunk
        return data

    def ended(self):
        """Children that have exited, looked at without reaping them."""
        return [child for child in self.children if child.reaped or _has_exited(child.pid)]

    def reap(self, child):
        """Wait for an ended child, after killing whatever it started and left behind (it is
        a zombie until then, so its pid and group id cannot have been reused). Returns its
        exit code (negative: the signal that killed it)."""
        if not child.reaped:
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signal.SIGKILL)
            if child.group is not None:
                self.cgroups.kill_all(child.group)   # what left its process group, too
            child.process.join()
            child.reaped = True
        self.children.remove(child)
        code = child.process.exitcode
        child.process.close()
        for fd in (child.from_child, child.to_child):
            os.close(fd)
        if child.group is not None:
            child.oom_killed = self.kernel_oom(child)   # before its group is removed
            self.cgroups.release(child.group)
        return code

    def kernel_oom(self, child):
        """Did the kernel's OOM killer take a process of child's current job? "limit": its
        group hit its own limit; "outside": memory ran out above it (the machine, or a
        group above the supervisor); None: no."""
        if child.group is None:
            return None
        run = child.current
        base = run.oom_base if run is not None and run.oom_base is not None else child.oom_base
        if run is not None and run.oom_base is None and child.handed > 1:
            return None      # a pooled child's next job, not started: the kills are older
        return oom_verdict(self.cgroups.version, base, self.cgroups.oom_counts(child.group))

    def busy(self):
        """How many children have a job (a slot each)."""
        return sum(1 for child in self.children if child.runs)

    def idle(self):
        return [child for child in self.children
                if not child.runs and not child.retired and not child.done]

    def retire(self, child):
        """Let an idle child go: SIGTERM ends a child waiting for a job at once."""
        child.retired, child.retired_tick = True, time.monotonic()
        self.signal(child, signal.SIGTERM)

    def retire_idle(self, idle_s, linger_s):
        """Let go of children idle for idle_s; SIGKILL retired ones lingering past linger_s."""
        tick = time.monotonic()
        for child in self.idle():
            if tick - child.idle_since_tick > idle_s:
                self.retire(child)
        for child in self.children:
            if child.retired and not child.runs and tick - child.retired_tick > linger_s:
                self.signal(child, signal.SIGKILL)

    def signal(self, child, signum):
        if child.reaped:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if signum == signal.SIGKILL:
                os.killpg(child.pid, signum)           # the job and what it started
            os.kill(child.pid, signum)
        if signum == signal.SIGKILL and child.group is not None:
            self.cgroups.kill_all(child.group)         # and what left its process group

    def waitables(self, with_pipes):
        """What to wait on: every child's exit, and (with_pipes) what they say."""
        ready = [child.process.sentinel for child in self.children if not child.reaped]
        if with_pipes:
            ready += [child.from_child for child in self.children if not child.eof]
        return ready


class _Dispatch:
    """Which claimed job goes to which child: how many jobs to claim (free slots, and jobs
    handed ahead to pooled children whose jobs are short), and handing them out in claim
    order, holding here what no child should take yet. Runs are tracked in `runs` (the
    supervisor's) from their claim until their ending is committed."""

    def __init__(self, pool, options, runs):
        self.pool, self.options, self.runs = pool, options, runs
        self.held = []                   # runs claimed, waiting here for a free child
        self.run_s_by_task = {}          # how long each task's last job ran here
        self.no_start_until_tick = 0.0   # after a refused fork: not again before the next poll
        self.no_spare_until_tick = 0.0   # after a spare that failed: not again before then
        self.claimed_tick = None         # when jobs were last claimed

    def wanted(self, tick, stopping):
        """How many jobs to claim: one for each free slot (an idle child or a new one) not
        already taken by a job held here, and for pooled children whose last job was short,
        the next few, to hand them ahead of time."""
        if stopping or tick < self.no_start_until_tick:
            return 0
        wanted = max(0, self.options.slots - self.pool.busy() - len(self.held))
        if self.options.jobs_per_child > 1 and not self.held:
            for child in self._children_taking_ahead():
                wanted += ahead_wanted(child.last_run_s, max(0, len(child.runs) - 1),
                                       self.options.jobs_per_child - child.handed - 1)
        return wanted

    def _children_taking_ahead(self):
        """Pooled children that may be handed jobs ahead: not stopping, and busy (if at all)
        with a job of a task known to be short, so nothing handed waits behind a long job."""
        return [child for child in self.pool.children
                if not (child.done or child.dropping or child.retired)
                and not (child.runs and (child.current.stop_reason or not all(
                    self._short(run.job.task) for run in child.runs)))]

    def _short(self, task):
        return self.run_s_by_task.get(task, AHEAD_WORK_S) < AHEAD_WORK_S

    def hand_out(self, claimed, tick):
        """Jobs held here first, then those just claimed, in claim order: to idle children,
        then to new children for free slots, then ahead to pooled children while the next
        job's task is one whose last job was short here. The rest are held for the next
        child that is free: a job never waits in a child behind a long one, and jobs still
        start in claim order."""
        if claimed:
            self.claimed_tick = tick
        runs = self.held + [self.track(job, tick) for job in claimed]
        self.held = []
        idle = self.pool.idle()
        # (a spare is a child beyond the slots: an idle one is used only for a free slot)
        while runs and self.pool.busy() < self.options.slots:
            run = runs.pop(0)
            if idle:
                child = idle.pop(0)
                spare = not child.handed
                self.pool.hand(child, run)
                if spare:                 # a fresh child as a fork would be: said alike,
                    run.forked = True     # and charged alike if it dies before it starts
                    _log_start(run)
                continue
            try:
                self.pool.fork(run, tick)
                _log_start(run)
            except OSError as exc:        # fork refused (memory, pid limit): give back
                log.error("cannot start a child: %s; jobs go back to the queue", exc)
                for unplaced in [run, *runs]:
                    unplaced.ending = Ending(ENDING_REQUEUED, f"could not start a child: {exc}")
                self.no_start_until_tick = tick + self.options.poll_s     # not again at once
                return
        for child in self._children_taking_ahead():
            want = ahead_wanted(child.last_run_s, len(child.runs) - 1,
                                self.options.jobs_per_child - child.handed)
            while runs and want > 0 and self._short(runs[0].job.task):
                self.pool.hand(child, runs.pop(0))
                want -= 1
        self.held = runs

    def keep_spare(self, tick, wanted):
        """Where each job's fresh child goes into a cgroup of its own, keep one forked ahead,
        so the next job starts without waiting for the move (see ChildPool.fork_spare).
        Pooled children pay the move once each and keep their group: no spare. wanted: the
        supervisor may start jobs now (serving, at memory level normal). Only while jobs
        come: a spare waits CHILD_IDLE_S at most (retire_idle), and none is forked after a
        quiet spell that long, so an idle supervisor holds no extra process. A spare that
        ends before it is handed a job is not replaced before the next poll."""
        if (self.pool.cgroups is None or self.options.jobs_per_child > 1 or not wanted
                or tick < self.no_spare_until_tick or self.pool.idle()
                or self.claimed_tick is None or tick - self.claimed_tick > CHILD_IDLE_S):
            return
        try:
            self.pool.fork_spare(self.options.memory_limit_bytes)
        except OSError as exc:            # fork or group refused: jobs fork as they come
            log.warning("cannot fork a spare child: %s", exc)
            self.no_spare_until_tick = tick + self.options.poll_s

    def spare_lost(self, tick):
        """A spare ended before it was handed a job (killed, or it failed at start): the
        next one waits for the next poll, so a spare that cannot live is not a fork loop."""
        self.no_spare_until_tick = tick + self.options.poll_s

    def give_back_held(self, allowed=()):
        """Held jobs whose priority may not start now go back to the queue, uncharged."""
        for run in [run for run in self.held if run.job.priority_value not in allowed]:
            self.held.remove(run)
            run.ending = Ending(ENDING_REQUEUED, "handed back before it started")

    def track(self, job, tick):
        limit = job.memory_limit_bytes or self.options.memory_limit_bytes
        run = self.runs[job.id] = _Run(job, None, limit, tick,
                                       process_rss_bytes(os.getpid()) or 0)
        return run


class Supervisor:
    """Runs jobs from a queue, each in its own child under rlimits, at most `slots` at once,
    deciding job by job from memory pressure whether to run, skip or preempt.

    step() does one round (observe, decide, act) and returns when it next needs to run;
    run() loops it until SIGTERM/SIGINT (or, with burst=True, until nothing runs or is due)."""

    def __init__(self, queue, options=None, *, tasks=None, probe=None, notifier=None,
                 isolation=None, pressure_trigger=None, **option_values):
        if options is not None and option_values:
            raise BadInput("give a Supervisor its options or option values, not both")
        self.queue = queue
        self.options = options if options is not None else SupervisorOptions(**option_values)
        self.tracker = self.options.level_tracker()
        self.probe = self.options.memory_probe(probe)
        self.tasks = dict(tasks if tasks is not None else queue.registry)
        self.tasks.setdefault("heartbeat", builtin_tasks(queue)["heartbeat"])
        self.id = f"{os.uname().nodename}:{os.getpid()}:{random.randrange(1 << 32):08x}"
        self.host = host_identity()
        self.pressure = None
        self.output_dir = output_dir_of(queue.path)
        self._output_problem = None      # why job output cannot be kept now (said once)
        # (kept here: its groups are removed when it is collected)
        self.isolation = isolation or Isolation.resolve(self.options.isolation)
        cgroups = self.isolation.cgroups
        import multiprocessing
        self.pool = ChildPool(ChildSpec(os.getpid(), None, self.tasks, self.options.jobs_per_child,
                                        self.output_dir, cgroups and cgroups.version),
                              multiprocessing.get_context("fork"), cgroups)
        self._runs = {}                 # job id -> _Run, from its claim to its ending committed
        self._events = []               # decisions to record with the next commit
        self._samples = []              # memory samples to record with the next commit
        self._next_sample_tick = 0.0
        self._stopping = self._stop_now = self._finished = False
        self._next_poll_tick = self._next_heartbeat_tick = self._next_purge_tick = 0.0
        self._data_version = None
        self._quiet_until_tick = 0.0     # after a failed write: sleep a poll, deaf to writes
        self._unchecked_write = False     # another process wrote: cancels not yet looked at
        self._drained = False             # the last claim found fewer jobs than it wanted
        self.dispatch = _Dispatch(self.pool, self.options, self._runs)
        self.notifier = notifier if notifier is not None else \
            _SystemdNotifier.from_environ(os.environ)
        self._pressure_trigger = pressure_trigger    # None: run() opens one (PSI)

    # the options most read, by their names
    slots = property(lambda self: self.options.slots)
    poll_s = property(lambda self: self.options.poll_s)
    grace_s = property(lambda self: self.options.grace_s)

    # -- the loop -----------------------------------------------------------------------

    def register(self):
        """Store our task declarations and our row: our lease on the jobs we claim."""
        self.queue.register_supervisor(self.id, self.host, sorted(self.tasks),
                                       [task.defaults for task in self.tasks.values()],
                                       self.isolation.mode)

    def run(self):
        """Serve until stopped; returns 0. Children are forked: about ten times faster to
        start than forkserver or spawn here, and safe because a child never uses the
        supervisor's SQLite connection (it never touches the file)."""
        import ctypes
        for name in ("resource", "traceback"):   # imported once here, not in every child
            __import__(name)
        libc = ctypes.CDLL(None, use_errno=True)
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        self.pool.spec.prctl = getattr(libc, "prctl", None)
        self.register()
        log.info("supervisor %s serving %s on %s (slots %d, memory limit %s)", self.id,
                 ", ".join(sorted(self.tasks)), self.queue.path, self.slots,
                 format_bytes(self.options.memory_limit_bytes))
        log.info("memory isolation: %s (%s)", self.isolation.mode, self.isolation.why)
        trigger = self._pressure_trigger
        if trigger is None:
            trigger, said = open_pressure_trigger(getattr(self.probe, "cgroup", None),
                                                  self.options.psi)
            log.info("%s", said)
        sleeper = _Sleeper(self.queue.path, libc, self.options.notice_s, trigger)
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)     # give back the heap left over from compiling this module
        self.notifier.ready()       # registered (our lease is in the file) and serving
        try:
            while not self._finished:
                # STOPPING=1 at the first turn that sees a signal (handlers only set flags).
                self.notifier.turn(time.monotonic(), stopping=self._stopping)
                # The sleep below is bounded by the memory poll (0.25 s by default), so the
                # loop turns far more often than the watchdog needs; the notifier's own
                # deadline bounds it too, for a --poll longer than WatchdogSec allows.
                wake_tick = min(self._step_surviving(), self.notifier.next_tick())
                if time.monotonic() < self._quiet_until_tick:
                    stalled = sleeper.sleep_quietly(wake_tick)
                else:
                    # Every slot busy: a new job could not start anyway, so writes need not
                    # wake us (a busy queue would otherwise wake us at every commit).
                    stalled = sleeper.sleep(wake_tick, self.pool,
                                            watch_writes=self.pool.busy() < self.slots)
                if stalled:
                    self.memory_stalled()
        finally:
            self.notifier.stopping()    # if a burst end or an error got here first
            sleeper.close()
            if sleeper.trigger is not None:
                sleeper.trigger.close()
            self.abandon_children()
            if self.pool.cgroups is not None:
                self.pool.cgroups.close()
            self.queue.unregister_supervisor(self.id)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("supervisor %s stopped", self.id)
        return 0

    def _step_surviving(self):
        """step(), but a database that is busy past the timeout or full is waited out, not a
        reason to stop and kill every running job. What children reported stays pending and
        is committed once the file can be written again."""
        try:
            return self.step()
        except DatabaseUnusable as exc:
            if not exc.waitable:
                raise
            log.warning("%s; trying again", exc)
            tick = time.monotonic()
            if self._stopping:                 # stopping needs signals, not the file
                self._shut_down(tick)
            if self._stop_now:
                # A second signal: leave now. What could not be written stays as the file
                # has it: running under our lease, which the next supervisor recovers.
                self._finished = True
            self._enforce_limits(tick)
            # Our own failed writes touch the directory, so the watch would wake us at once:
            # sleep the poll out, woken only by a signal.
            self._quiet_until_tick = tick + self.poll_s
            return self._quiet_until_tick

    def _on_signal(self, signum, frame):
        # Only flags: the loop does the work.
        if self._stopping:
            self._stop_now = True
        self._stopping = True

    def memory_stalled(self):
        """The kernel says tasks stall on memory (a PSI trigger fired): the next step reads
        memory and decides at once, not at the next poll."""
        log.debug("memory stall (PSI): reading memory now")
        self._next_poll_tick = 0.0

    def stop(self, now_=False):
        """Ask the loop to stop (as SIGTERM would; now_=True as a second signal would)."""
        self._stop_now = self._stop_now or now_
        self._stopping = True

    def step(self, at=None, tick=None):
        """One round: observe (what children said, who ended, memory, other writers),
        decide (endings, limits, memory, claims) and act (one commit, then hand over, fork
        and signal). Returns the tick at which it next has something to do.

        Two clocks: `at` (wall time, now()) is what the database records; `tick`
        (time.monotonic()) times polls, timeouts, grace periods and the hysteresis hold,
        so a wall clock stepped by NTP neither kills jobs early nor stalls the loop. A test
        that passes only `at` drives both with it."""
        if tick is None:
            tick = time.monotonic() if at is None else at
        at = now() if at is None else at
        # observe
        for run, current in self.pool.read():
            self._end(run, current=current, exit_code=None)
        freed = self._settle_ended_children()
        polled = tick >= self._next_poll_tick
        if polled:
            self._poll_memory(at, tick)
        if tick >= self._next_heartbeat_tick:
            self._housekeeping(at, tick)
        written = self._another_wrote()
        # decide
        self._enforce_limits(tick)
        self._ask_pending_cancels(tick)
        if written and (polled or self.pool.busy() < self.slots):
            self._unchecked_write = False          # (a write seen now is checked next poll)
            self._apply_cancels(tick)
        if self._stopping:
            self._shut_down(tick)
        wanted = self._wanted(tick, at, written, polled, freed)
        # act
        claimed = self._commit(at, wanted)
        if wanted:
            self._drained = len(claimed) < wanted
        if claimed:
            self._prepare_output()
        self.dispatch.hand_out(claimed, tick)
        self.dispatch.keep_spare(tick, not self._stopping and self.tracker.level == "normal")
        self.pool.flush_all()                   # what a full pipe held back before
        self._finish_if_done(at)
        if self.options.keep_s is not None and tick >= self._next_purge_tick:
            self._retain(at)
            self._next_purge_tick = tick + min(60.0, max(1.0, self.options.keep_s / 4))
        return min(self._next_poll_tick, self._next_heartbeat_tick, self._next_deadline_tick())

    # -- observe ------------------------------------------------------------------------

    def _settle_ended_children(self):
        """Reap children that have exited (what they said before they ended was read first)
        and decide what their unfinished jobs become. Returns how many slots that freed,
        counting jobs whose child reported them finished."""
        freed = sum(1 for run in self._runs.values()
                    if run.ending is not None and run.child is not None)
        for child in self.pool.ended():
            for run, current in self.pool.read():   # last words, if they came after the read
                self._end(run, current=current, exit_code=None)
            code = self.pool.reap(child)
            if not child.handed and not child.retired:
                self.dispatch.spare_lost(time.monotonic())
            for index, run in enumerate(child.runs):
                # Its job then, if it had started it (or was forked for it): a job handed
                # over and never started costs nothing, whatever became of the child.
                current = index == 0 and (run.started_tick is not None or run.forked)
                if current and child.oom_killed:
                    self._blame_kernel_oom(run, child.oom_killed)
                self._end(run, current=current, exit_code=code)
            freed += bool(child.runs)
            child.runs = []
        return freed

    def _blame_kernel_oom(self, run, how):
        """The kernel's OOM killer took a process of run's job (how: see ChildPool.
        kernel_oom). At its own group's limit, the job failed for memory (unless it was
        being cancelled). Memory running out outside its group is not the job's fault: it
        goes back to the queue as after an emergency kill (charged only if it saved no
        checkpoint), and a stop already decided keeps its reason. A job that reported how
        it ended told the kill itself."""
        if run.stop_reason == STOP_CANCEL or run.reported is not None:
            return
        if how == "limit":
            run.stop_reason, run.detail = STOP_MEMORY, (
                f"{KERNEL_OOM}: its cgroup reached the {format_bytes(run.memory_limit_bytes)} "
                f"limit")
        elif run.stop_reason is None:
            run.stop_reason, run.detail = STOP_EMERGENCY, KERNEL_OOM_OUTSIDE

    def _end(self, run, *, current, exit_code):
        if run.reported is not None and run.child is not None:
            self.dispatch.run_s_by_task[run.job.task] = run.child.last_run_s
        run.ending = run_ending(run.reported, current=current, stop_reason=run.stop_reason,
                                detail=run.detail, exit_code=exit_code, saved=run.saved,
                                started=run.started_tick is not None)
        if run.ending.state == ENDING_FAILED and run.reported is None and self._output_problem:
            run.ending.reason += f"\n(job output discarded: {self._output_problem})"

    def _prepare_output(self):
        """Before jobs are handed out: the output directory, made if missing (also when it
        was deleted while we ran). A problem with it is said once in the log; meanwhile
        jobs run with their output discarded (their child finds it unusable too)."""
        try:
            check_output_dir(self.output_dir, create=True)
            problem = None
        except (OSError, OutputRefused) as exc:
            problem = str(exc)
        if problem != self._output_problem:
            if problem is not None:
                log.error("job output: %s; jobs run with their output discarded", problem)
            else:
                log.info("job output kept in %s", self.output_dir)
        self._output_problem = problem

    def _output_bytes(self, run):
        """The size of a run's output file now (a stat: cheap enough for every poll)."""
        try:
            return os.stat(output_file_of(self.output_dir, run.job.id)).st_size
        except OSError:                   # not made yet, or its directory was deleted
            return run.output_bytes

    def _poll_memory(self, at, tick):
        reading = self.probe.read([child.pid for child in self.pool.children])
        self.pressure = reading.pressure
        before = self.tracker.level
        level = self.tracker.update(reading.pressure, tick)
        self._next_poll_tick = tick + self.poll_s
        if level != before:
            log.warning("memory level %s -> %s at %.1f%%", before, level, reading.pressure)
            self._events.append(("level", None, None, before, level, "memory pressure",
                                 reading.pressure, at))
        if tick >= self._next_sample_tick:
            # Written by this step's commit, with what the children reported: busy, a sample
            # costs no transaction of its own; idle, it makes one unsynced commit per 5 s.
            # Here rather than with the heartbeat: this reading has tree_bytes, and 5 s is
            # kept exactly. Bounded should commits keep failing (a busy file).
            self._samples = self._samples[-MAX_PENDING_SAMPLES + 1:] + [
                (at, reading.pressure, level, reading.tree_bytes)]
            self._next_sample_tick = tick + PRESSURE_SAMPLE_S
        for child in self.pool.children:
            run = child.current
            if run is not None:
                run.rss_bytes = job_rss_bytes(child.pid) or run.rss_bytes
                run.output_bytes = self._output_bytes(run)
                if child.group is not None:
                    run.charged_bytes = group_usage_bytes(self.pool.cgroups.version,
                                                          child.group)
                how = None if run.killed else self.pool.kernel_oom(child)
                if how and run.reported is None:
                    # v1 kills one process of the group, not all (v2's memory.oom.group):
                    # the rest of the job goes too, as one failure.
                    self._blame_kernel_oom(run, how)
                    self._kill(run, run.stop_reason, run.detail, at)
        self._apply_memory_plan(level, reading.pressure, at, tick)

    def _housekeeping(self, at, tick):
        """Every SUPERVISOR_HEARTBEAT_S: renew our lease, recover jobs of dead supervisors,
        expire waiting jobs past their TTL."""
        running = [{"id": run.job.id, "task": run.job.task, "rss_bytes": run.rss_bytes,
                    "pid": run.child.pid}
                   for run in self._runs.values()
                   if run.child is not None and run is run.child.current]
        alive = self.queue.supervisor_heartbeat(self.id, at, self.tracker.level,
                                                self.pressure, running)
        if not alive and not self._stopping:     # taken for dead (a long stall): re-register
            log.warning("supervisor %s was taken for dead; its jobs were given to others: "
                        "stopping their children and registering again", self.id)
            for run in self._runs.values():          # their leases are gone: no double runs
                run.lease_lost = True
                if run.child is not None and not run.killed:
                    self._kill(run, STOP_SHUTDOWN, "lease lost while the supervisor stalled", at)
            self.dispatch.give_back_held()        # (the file says they are not ours now)
            self.register()
        self.queue.recover_orphans(
            self.id, lambda sup, at_: supervisor_alive(sup, self.host, at_), at)
        self.queue.expire(at=at)
        self.pool.retire_idle(CHILD_IDLE_S, self.grace_s)
        if self.pool.cgroups is not None:
            self.pool.cgroups.retry_leftover()
            self.pool.cgroups.remove_stale()       # a supervisor beside us died (kill -9)
        self._next_heartbeat_tick = tick + SUPERVISOR_HEARTBEAT_S

    def _another_wrote(self):
        """Has another connection (a producer, a CLI) written since we last looked?"""
        version = self.queue.data_version()
        changed = version != self._data_version
        self._data_version = version
        self._unchecked_write = self._unchecked_write or changed
        return self._unchecked_write

    def _retain(self, at):
        deleted = self.queue.purge(self.options.keep_s, at=at)
        self.queue.checkpoint_wal()
        if deleted:
            log.info("retention: purged %d finished jobs older than %gs", deleted,
                     self.options.keep_s)

    # -- decide -------------------------------------------------------------------------

    def _live_runs(self):
        """Runs that are their child's job now: what limits and memory decisions act on."""
        return [child.current for child in self.pool.children
                if child.current is not None and child.current.ending is None]

    def _apply_memory_plan(self, level, pressure, at, tick):
        if level != "normal":
            for child in self.pool.idle():
                self.pool.retire(child)              # idle children hold memory for nothing
        allowed = claimable_priorities(level, self._stopping)
        self.dispatch.give_back_held(allowed)
        for child in self.pool.children:             # jobs handed ahead that may not start now
            if any(run.job.priority_value not in allowed for run in child.runs[1:]):
                self.pool.drop_ahead(child)
        live = {run.job.id: run for run in self._live_runs()}
        plan = plan_memory(level, [run.view() for run in live.values()])
        for job_id in plan.kill:
            self._kill(live[job_id], STOP_EMERGENCY, f"memory emergency at {pressure:.1f}%", at)
        if plan.preempt is not None:
            self._ask_stop(live[plan.preempt], STOP_PREEMPT,
                           f"preempted at {pressure:.1f}% memory pressure", tick, at)
        if plan.shed:
            for job_id in self.queue.shed_due(tasks=self.tasks, at=at, pressure=pressure):
                log.info("job %d shed at %.1f%% memory pressure", job_id, pressure)

    def _next_deadline_tick(self):
        """The earliest kill, timeout or start deadline a live run has coming: the loop
        wakes for it, so a long --poll (with PSI wake-ups, a cheap choice) does not stretch
        a grace period or a timeout by up to a poll."""
        ticks = []
        for run in self._live_runs():
            if run.killed:
                continue
            if run.kill_at_tick is not None:
                ticks.append(run.kill_at_tick)
            if run.started_tick is None:
                ticks.append(run.handed_tick + self.options.start_deadline_s)
            elif run.job.timeout_s is not None and run.stop_reason is None:
                ticks.append(run.started_tick + run.job.timeout_s)
        return min(ticks, default=math.inf)

    def _wanted(self, tick, at, written, polled, freed):
        """How many jobs to claim now. After a claim that found fewer than it wanted, with
        nothing written or freed since, only time passing can have made a job claimable (a
        delay, a retry's backoff, a breaker's cooldown): a read says whether, before a write
        transaction that would claim nothing. Without it a supervisor with a free slot and
        nothing to do took the write lock at every poll (4 times a second)."""
        if not (written or polled or freed):
            return 0
        wanted = self.dispatch.wanted(tick, self._stopping)
        if (wanted and self._drained and not (written or freed)
                and not self.queue.has_due(tasks=self.tasks, at=at)):
            return 0
        return wanted

    def _enforce_limits(self, tick):
        """Per-job memory limit, start deadline, timeout and output limit; SIGKILL for a stop
        past its grace."""
        for run in self._live_runs():
            verdict = limits_verdict(run.facts(tick, self.options.output_limit_bytes), tick,
                                     grace_s=self.grace_s,
                                     start_deadline_s=self.options.start_deadline_s)
            if verdict is None:
                continue
            if verdict.action == "kill":
                run.kill_at_tick = None      # the verdict's reason is why it ends
                self._kill(run, verdict.reason, verdict.detail, now())
            else:
                run.stop_reason, run.detail = verdict.reason, verdict.detail
                run.kill_at_tick = verdict.kill_at_tick
                self.pool.signal(run.child, signal.SIGTERM)

    def _apply_cancels(self, tick):
        """Runs someone asked to cancel: held here, it goes back (and ends cancelled); handed
        ahead, its child is asked to drop it; running, asked to stop (see _ask_pending)."""
        if not self._runs:
            return
        for job_id in self.queue.cancel_requested(list(self._runs)):
            run = self._runs[job_id]
            run.cancel_asked = True
            if run in self.dispatch.held:
                self.dispatch.held.remove(run)
                run.ending = Ending(ENDING_REQUEUED, "cancel requested")
            elif run.child is not None and run is not run.child.current:
                self.pool.drop_ahead(run.child)   # if it starts it first: stopped when current
        self._ask_pending_cancels(tick)

    def _ask_pending_cancels(self, tick):
        for run in self._live_runs():
            if run.cancel_asked and run.stop_reason != STOP_CANCEL and not run.killed:
                self._ask_stop(run, STOP_CANCEL, "cancel requested", tick, now())

    def _shut_down(self, tick):
        """First signal: ask every job to stop at its next checkpoint, kill after the grace
        period. Second signal: kill them all now. Either way their jobs go back to queued."""
        for child in self.pool.idle():
            self.pool.retire(child)
        for child in self.pool.children:
            self.pool.drop_ahead(child)
        self.dispatch.give_back_held()
        live = {run.job.id: run for run in self._live_runs()}
        stops = shutdown_stops([(job_id, run.stop_reason) for job_id, run in live.items()],
                               stop_now=self._stop_now)
        for job_id, action in stops.items():
            run = live[job_id]
            if action == "kill" and not run.killed:
                if run.stop_reason not in (STOP_CANCEL, STOP_TIMEOUT, STOP_MEMORY):
                    run.stop_reason, run.detail = STOP_SHUTDOWN, "supervisor stopped at once"
                run.kill_at_tick, run.killed = None, True
                self.pool.signal(run.child, signal.SIGKILL)
            elif action == "ask":
                self._ask_stop(run, STOP_SHUTDOWN, "supervisor shutting down", tick, None)
                # Kill early enough that reaping and exiting still fit within the grace
                # (the loop wakes for the kill itself: see _next_deadline_tick).
                run.kill_at_tick = tick + self.grace_s - min(2 * self.poll_s, self.grace_s / 4)

    # -- act ----------------------------------------------------------------------------

    def _ask_stop(self, run, reason, detail, tick, at=None):
        """Ask a child to stop at its next checkpoint; SIGKILL after the grace period."""
        run.stop_reason, run.detail, run.kill_at_tick = reason, detail, tick + self.grace_s
        self.pool.signal(run.child, signal.SIGUSR1)
        log.info("job %d %s asked to stop: %s", run.job.id, run.job.task, detail)
        if reason == STOP_PREEMPT:
            self._events.append(("decision", run.job.id, run.job.task, RUNNING, "preempt",
                                 detail, self.pressure, now() if at is None else at))

    def _kill(self, run, reason, detail, at):
        """SIGKILL now, recorded with the pressure. A kill at the end of a grace keeps the
        reason it was asked to stop for (the job's error says timeout, not 'killed'); an
        emergency that overtakes a preemption says it was the emergency."""
        if run.kill_at_tick is None or (reason == STOP_EMERGENCY
                                        and run.stop_reason == STOP_PREEMPT):
            run.stop_reason, run.detail = reason, detail
        run.kill_at_tick, run.killed = None, True
        self.pool.signal(run.child, signal.SIGKILL)
        log.warning("job %d %s killed: %s", run.job.id, run.job.task, detail)
        self._events.append(("decision", run.job.id, run.job.task, RUNNING, "kill", detail,
                             self.pressure, at))

    def _commit(self, at, wanted=0):
        """One transaction for everything the children reported since the last commit, the
        endings decided, the decisions to record, and the jobs wanted next (group commit).
        Then: acknowledge the checkpoints it saved, forget the runs it ended. Returns the
        jobs claimed. If it fails (a busy or full file) everything stays pending."""
        records = [run for run in self._runs.values() if run.ending is not None
                   or run.checkpoint is not None or run.progress is not None]
        if not (records or self._events or self._samples or wanted):
            return []
        claims = [(self.tasks, claimable_priorities(self.tracker.level, self._stopping),
                   wanted, self.options.age_s)] if wanted else []
        states, claimed = self.queue.record_runs(
            self.id, [RunRecord(run.job.id, run.job.attempts, run.progress, run.checkpoint,
                                run.ending, self.pressure) for run in records],
            events=self._events, claims=claims, samples=self._samples, at=at)
        self._events, self._samples = [], []
        for run in records:
            state = states[run.job.id]
            run.progress = run.checkpoint = None
            if run.ending is not None:
                del self._runs[run.job.id]
                _log_ending(run, state)
            elif state is None:                   # the file says the job is not ours now
                run.lease_lost = True
                if not run.killed:
                    self._kill(run, STOP_SHUTDOWN, "its lease was lost", at)
            elif run.ack_owed:
                run.ack_owed = False
                self.pool.ack(run)
        return claimed[0] if claimed else []

    def _finish_if_done(self, at):
        if self._runs:
            return
        if self._stopping or (self.options.burst
                              and not self.queue.has_due(tasks=self.tasks, at=at)):
            self._finished = True

    def abandon_children(self):
        """Leaving run(): let idle children go, kill those still running (after an error in
        the loop) and give their jobs back, so nothing is lost."""
        for run in self._live_runs():
            run.stop_reason = run.stop_reason or STOP_SHUTDOWN
            run.detail = run.detail or "supervisor stopped"
            self.pool.signal(run.child, signal.SIGKILL)
        for child in self.pool.children:
            if not child.runs and not child.retired:
                self.pool.retire(child)
        kill_tick = time.monotonic() + 2.0
        while self.pool.children:
            for run, current in self.pool.read():
                self._end(run, current=current, exit_code=None)
            self._settle_ended_children()
            if self.pool.children:
                if time.monotonic() > kill_tick:       # a SIGTERM'd idle child did not go
                    for child in self.pool.children:
                        self.pool.signal(child, signal.SIGKILL)
                time.sleep(0.005)
        self.dispatch.give_back_held()
        with contextlib.suppress(Error):
            self._commit(now())


def _log_start(run):
    log.info("job %d %s started (attempt %d/%d, pid %d)", run.job.id, run.job.task,
             run.job.attempts, run.job.max_attempts, run.child.pid)


def _log_ending(run, state):
    """One line in the log for each run whose ending was committed."""
    job, ending = run.job, run.ending
    if state is None:
        log.warning("job %d %s: its lease was lost; another owner has it", job.id, job.task)
    elif state == DONE:
        log.info("job %d %s done in %.3fs", job.id, job.task,
                 time.monotonic() - (run.started_tick or run.handed_tick))
    elif ending.state == ENDING_FAILED:
        log.warning("job %d %s failed (attempt %d/%d), now %s: %s", job.id, job.task,
                    job.attempts, job.max_attempts, state, _last_line(ending.reason))
    else:
        log.info("job %d %s %s: %s", job.id, job.task, state, ending.reason)


class _Sleeper:
    """How the supervisor's loop waits: until its next deadline, a child's exit or words, a
    signal (through a wake-up pipe), another process's write to the database (inotify on
    its directory; where that is missing, a look every notice_s), or a memory stall (a PSI
    trigger, where there is one: sleep() then returns True)."""

    def __init__(self, path, libc, notice_s, trigger=None):
        self.notice_s, self.trigger = notice_s, trigger
        self.watch = _DirectoryWatch.open(path, libc)
        self.watch_busy_until_tick = 0.0
        self.wakeup_r, wakeup_w = os.pipe()          # a signal wakes the loop at once
        os.set_blocking(wakeup_w, False)
        self.wakeup_w = wakeup_w
        self.previous_wakeup = signal.set_wakeup_fd(wakeup_w)

    def wait(self, fds, timeout_s):
        """The fds of `fds` readable (or hung up: a child's exit, a closed pipe) within
        timeout_s, and whether the pressure trigger fired. select.poll of our own:
        multiprocessing.connection.wait waits for readability only, and a PSI trigger
        signals POLLPRI."""
        import select
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        trigger_fd = self.trigger.fd if self.trigger is not None else None
        if trigger_fd is not None:
            poller.register(trigger_fd, select.POLLPRI)
        ready, stalled = set(), False
        for fd, events in poller.poll(math.ceil(max(0.0, timeout_s) * 1000)):
            if fd != trigger_fd:
                ready.add(fd)
            elif events & (select.POLLERR | select.POLLNVAL):
                # Its cgroup is gone; it would report POLLERR at every poll from now on.
                log.warning("PSI trigger on %s failed: memory is read at each poll only",
                            self.trigger.path)
                self.trigger.close()
                self.trigger = None
            elif events & select.POLLPRI:
                stalled = True
        return ready, stalled

    def sleep(self, wake_tick, pool, *, watch_writes):
        """Until wake_tick or something to do; True if that was a memory stall (PSI)."""
        # While children keep reporting, read them at most every CHANNEL_BATCH_S: each
        # wake-up and each commit costs more than a batch of lines. An exit wakes us at once.
        batching = time.monotonic() < pool.read_tick + CHANNEL_BATCH_S
        if batching:
            wake_tick = min(wake_tick, pool.read_tick + CHANNEL_BATCH_S)
        if any(child.outbox for child in pool.children):       # a pipe was full: try again
            wake_tick = min(wake_tick, time.monotonic() + self.notice_s)
        left = max(0.0, wake_tick - time.monotonic())
        ready = [self.wakeup_r, *pool.waitables(with_pipes=not batching)]
        if not watch_writes:
            woken, stalled = self.wait(ready, left)
        elif self.watch is None:
            woken, stalled = self.wait(ready, min(left, self.notice_s))
        else:
            # A write wakes us before its commit is visible (SQLite updates the WAL index
            # after writing and syncing the frames), so after each write look again every
            # 2 ms for a moment; idle, we wake only for the memory poll.
            limit = 0.002 if time.monotonic() < self.watch_busy_until_tick else left
            woken, stalled = self.wait(ready + [self.watch.fd], min(left, limit))
            if self.watch.fd in woken:
                self.watch.drain()
                self.watch_busy_until_tick = time.monotonic() + 0.03
        if self.wakeup_r in woken:
            self._drain_wakeup()
        return stalled

    def sleep_quietly(self, wake_tick):
        """Until wake_tick, a signal or a memory stall (True) only: our own failed writes
        would wake the watch."""
        woken, stalled = self.wait([self.wakeup_r], wake_tick - time.monotonic())
        if self.wakeup_r in woken:
            self._drain_wakeup()
        return stalled

    def _drain_wakeup(self):
        with contextlib.suppress(BlockingIOError):
            os.read(self.wakeup_r, 512)

    def close(self):
        signal.set_wakeup_fd(self.previous_wakeup)
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)
        if self.watch is not None:
            self.watch.close()


class _SystemdNotifier:
    """systemd's notify protocol (sd_notify(3)) without libsystemd: READY=1, WATCHDOG=1 and
    STOPPING=1, each one datagram to the AF_UNIX socket named by $NOTIFY_SOCKET (a leading
    `@` is the abstract namespace). Without that variable (not run by systemd as
    Type=notify) it does nothing. A send that fails is logged once and never raised into the
    loop: the supervisor serves on, and if systemd stops hearing from it, its watchdog
    restarts it, which is the point."""

    def __init__(self, address=None, watchdog_s=None):
        self.address = address
        # Half of WatchdogSec is systemd's advice; a quarter leaves room for a slow turn.
        self.watchdog_every_s = min(WATCHDOG_EVERY_S, watchdog_s / 4) if watchdog_s \
            else WATCHDOG_EVERY_S
        self.next_watchdog_tick = float("-inf")
        self.stopping_sent = self.failed = False

    @classmethod
    def from_environ(cls, environ):
        """From $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID (the environment given)."""
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and address.startswith("@"):
            address = "\0" + address[1:]
        elif address is not None and not address.startswith("/"):
            log.warning("NOTIFY_SOCKET=%s: not a socket path or @name; systemd will not "
                        "hear from this supervisor", address)
            address = None
        watchdog_s = None
        if environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid()):
            with contextlib.suppress(ValueError):
                watchdog_s = int(environ.get("WATCHDOG_USEC", "")) / 1e6 or None
        return cls(address, watchdog_s)

    @property
    def enabled(self):
        return self.address is not None

    def next_tick(self):
        """When the loop must turn next for the watchdog (never, without systemd)."""
        return self.next_watchdog_tick if self.enabled else float("inf")

    def ready(self):
        self._send("READY=1")

    def turn(self, tick, *, stopping):
        """One turn of the loop: STOPPING=1 the first time it sees a stop, and WATCHDOG=1
        if the last one is watchdog_every_s old."""
        if not self.enabled:
            return
        if stopping:
            self.stopping()
        if tick >= self.next_watchdog_tick:
            self.next_watchdog_tick = tick + self.watchdog_every_s
            self._send("WATCHDOG=1")

    def stopping(self):
        if not self.stopping_sent:
            self.stopping_sent = True
            self._send("STOPPING=1")

    def _send(self, message):
        if not self.enabled:
            return
        import socket
        try:
            # A socket for each message (every few seconds): no descriptor held open for
            # the forked children to inherit.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as exc:
            if not self.failed:
                self.failed = True
                log.warning("cannot notify systemd at %s (%s): %s; going on without it",
                            self.address.replace("\0", "@"), message, exc)


def host_identity():
    """Which pids mean the same processes: host name, boot, and pid namespace (two containers
    on one host share a name and a boot but not their pids)."""
    parts = [os.uname().nodename]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return "/".join(parts)


def _has_exited(pid):
    """Has this child exited? Looks without reaping it (WNOWAIT)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def supervisor_alive(sup, host, at):
    """On this host (same boot, same pid namespace) a supervisor is alive while its
    process is, however long it stalls (SIGSTOP, swapping): its children may still run.
    A supervisor elsewhere is alive while its lease (heartbeat) is fresh."""
    if sup["host"] == host:
        return _same_process_alive(sup)
    return sup["heartbeat_at"] > at - LEASE_S


def _same_process_alive(sup):
    """Is the supervisor's pid still the same process (not a reuse of its pid)?"""
    import psutil
    try:
        return abs(psutil.Process(sup["pid"]).create_time() - sup["started_at"]) < 1.0
    except psutil.Error:
        return False


# ======================================================================================
# Dashboard: a read-only page, /api/status, /api/jobs/ID and /metrics over HTTP
# ======================================================================================
# Its own process (`litequeue dashboard`), never the supervisor's: a slow browser or a
# stuck request cannot hold up the loop that keeps the machine alive. It only reads: the
# file is opened with create=False and every method but GET is refused.

DASHBOARD_BIND = "127.0.0.1:8732"
DASHBOARD_HISTORY_S = 3600.0         # the chart spans the last hour
DASHBOARD_EVENTS = 50                # the latest events on the page
DASHBOARD_DEAD = 20                  # the latest dead jobs on the page
DASHBOARD_OUTPUT_TAIL_BYTES = 64 * 1024
DEFAULT_THRESHOLDS = (70.0, 85.0, 95.0)
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _dashboard_page():
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard.html"),
              "rb") as f:
        return f.read()


def parse_bind(text):
    """(host, port) of "HOST:PORT" ("[::1]:8732" for IPv6); BadInput otherwise."""
    host, sep, port = str(text).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port_number = int(port)
    except ValueError:
        port_number = -1
    if not sep or not host or not 0 <= port_number <= 65535:
        raise BadInput(f"--bind {text!r}: HOST:PORT, like {DASHBOARD_BIND}")
    return host, port_number


def is_loopback(host):
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False                    # a name: it may resolve to anything


def dashboard_status(queue, at=None):
    """`Queue.status()` and what the page adds: the last hour of pressure, breakers with
    their cooldown left, each running job's memory limit, the latest events and dead jobs."""
    at = now() if at is None else at
    status = queue.status(at)
    for run in status["running"]:
        with contextlib.suppress(JobNotFound):      # finished since status() read it
            run["memory_limit_bytes"] = queue.get(run["id"]).memory_limit_bytes
    history = getattr(queue, "pressure_history", None)    # from the pressure-history work
    breakers = []
    for b in queue.breakers(at):
        left = (None if b["opened_at"] is None or b["state"] != "open"
                else max(0.0, round(b["opened_at"] + b["cooldown_s"] - at, 1)))
        breakers.append({**b, "cooldown_left_s": left})
    dead = [{"id": job.id, "task": job.task, "priority": job.priority,
             "finished_at": job.finished_at, "attempts": job.attempts,
             "error": _last_line(job.error or "")}
            for job in queue.jobs(state=DEAD, limit=DASHBOARD_DEAD)]
    return {**status, "at": at, "thresholds": list(DEFAULT_THRESHOLDS),
            "history": list(history(at - DASHBOARD_HISTORY_S)) if history else [],
            "breaker_list": breakers, "dead_jobs": dead,
            "events": queue.events(limit=DASHBOARD_EVENTS, newest=True)[::-1]}


def dashboard_job(queue, job_id):
    """One job for its page: its fields, its events, the last 64 KiB of its output."""
    job = queue.get(job_id)
    size = queue.output_bytes(job.id) or 0
    start = max(0, size - DASHBOARD_OUTPUT_TAIL_BYTES)
    tail = queue.output(job.id, start)[:DASHBOARD_OUTPUT_TAIL_BYTES] if size else b""
    return {"job": job.to_dict(), "events": queue.events(job_id=job.id, limit=500, newest=True),
            "output_bytes": size, "output_tail": tail.decode("utf-8", "replace"),
            "output_truncated": start > 0, "at": now()}


class DashboardApp:
    """The dashboard's routes as a function of (method, path, headers): no socket, so the
    rules (token, GET only, what each route answers) are tested without a server."""

    def __init__(self, queue, token=None, page=None):
        self.queue = queue
        self.token = token or None
        self.page = _dashboard_page() if page is None else page

    def respond(self, method, target, headers):
        """(status code, content type, body bytes, extra headers) for one request."""
        import urllib.parse
        url = urllib.parse.urlsplit(target)
        if not self._authorized(urllib.parse.parse_qs(url.query), headers):
            return self._text(401, "a token is needed: Authorization: Bearer TOKEN or ?token=",
                              {"WWW-Authenticate": 'Bearer realm="litequeue"'})
        if method != "GET":
            return self._text(405, "read-only: GET only", {"Allow": "GET"})
        path = url.path
        try:
            if path == "/" or path.startswith("/jobs/"):
                return 200, "text/html; charset=utf-8", self.page, {}
            if path == "/api/status":
                return self._json(dashboard_status(self.queue))
            if path.startswith("/api/jobs/"):
                return self._json(dashboard_job(self.queue, path[len("/api/jobs/"):]))
            if path == "/metrics":
                metrics_text = getattr(self.queue, "metrics_text", None)
                if metrics_text is None:
                    return self._text(404, "metrics are not available in this version")
                return 200, METRICS_CONTENT_TYPE, metrics_text().encode(), {}
        except (JobNotFound, BadInput) as exc:
            return self._text(404, str(exc))
        except Error as exc:            # locked past the busy timeout, an unsafe output dir:
            return self._text(503, str(exc))       # said to the page, which tries again
        return self._text(404, f"no page {path}")

    def _authorized(self, query, headers):
        import hmac
        if self.token is None:
            return True
        given = query.get("token", [""])[-1]
        scheme, _, credentials = (headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer":
            given = credentials.strip()
        return hmac.compare_digest(given.encode(), self.token.encode())

    @staticmethod
    def _json(value):
        body = json.dumps(value, default=str, allow_nan=False).encode()
        return 200, "application/json", body, {}

    @staticmethod
    def _text(code, message, headers=None):
        return code, "text/plain; charset=utf-8", (message + "\n").encode(), headers or {}


def serve_dashboard(queue, host, port, token=None, *, announce=print):
    """Serve the dashboard until interrupted; announce(url) once it listens."""
    import http.server
    import socket

    app = DashboardApp(queue, token)

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = f"litequeue/{__version__}"

        def __getattr__(self, name):            # do_POST, do_PUT, do_ANYTHING: refused
            if name.startswith("do_"):
                return self._answer
            raise AttributeError(name)

        def _answer(self):
            code, content_type, body, extra = app.respond(self.command, self.path, self.headers)
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            # Nothing from the network, and no other page may frame or script this one.
            self.send_header("Content-Security-Policy",
                             "default-src 'self'; style-src 'unsafe-inline'; "
                             "script-src 'unsafe-inline'; img-src 'self' data:; "
                             "frame-ancestors 'none'")
            self.send_header("X-Content-Type-Options", "nosniff")
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        do_GET = _answer

        def log_message(self, format, *args):     # a page polling every 2 s: not a log line
            log.debug("dashboard: " + format, *args)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    with Server((host, port), Handler) as server:
        bound_host, bound_port = server.server_address[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        announce(f"http://{shown}:{bound_port}/")
        server.serve_forever()


# ======================================================================================
# Command line
# ======================================================================================

def load_app(spec):
    """{name: Task} registered by the Queue objects of a module or .py file. The only code
    a supervisor will run comes from here: never from the database."""
    return load_app_with_files(spec)[0]


def load_app_with_files(spec):
    """({name: Task}, [the path each of its Queue objects opened, as given]) of an --app."""
    import importlib
    import importlib.util
    if not spec.strip():                # not the demo tasks in silence: say what is missing
        raise BadInput(f"--app {spec!r}: name a module or a FILE.py (without --app, serve "
                       f"runs the built-in tasks)")
    try:
        if spec.endswith(".py") or os.sep in spec:
            path = os.path.abspath(spec)
            if not os.path.isfile(path):
                raise BadInput(f"--app {spec}: no such file")
            sys.path.insert(0, os.path.dirname(path))      # its sibling modules import too
            name = os.path.splitext(os.path.basename(path))[0]
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())
            module = importlib.import_module(spec)
    except (Error, KeyboardInterrupt):  # Ctrl-C while it imports: exit 130, not bad input
        raise
    except BaseException as exc:        # SystemExit and friends from app code are bad input too
        message = str(exc).strip().splitlines()[-1:] or [""]
        raise BadInput(f"cannot import --app {spec}: {type(exc).__name__}: {message[0]}") from None
    tasks, files = {}, []
    for value in list(vars(module).values()):
        if isinstance(value, Queue):
            tasks.update(value.registry)
            files.append(value.path)
        elif isinstance(value, Task):
            tasks.setdefault(value.name, value)
            files.append(value.queue.path)
    if not tasks:
        raise BadInput(f"--app {spec} registers no tasks (no Queue with @queue.task in it)")
    return tasks, list(dict.fromkeys(files))


def served_file(db, app, app_files):
    """The file `serve` serves, and a warning to print (or None). --db (or $LITEQUEUE_DB)
    wins; without either, the file the app's Queue opened, so `serve --app tasks.py` serves
    what the app enqueues to; else ./litequeue.db. A mismatch is said out loud: jobs the app
    enqueues to another file would wait there forever."""
    opened = {os.path.abspath(path): path for path in app_files}
    if db is None:
        if len(opened) > 1:
            raise BadInput(f"--app {app} opens several databases ({', '.join(opened)}): "
                           f"say which to serve with --db")
        if not opened:
            return default_db_path(), None
        (absolute, given), = opened.items()
        if given == absolute:
            return given, None
        return absolute, (f"serving {absolute}, the file --app {app} opens as Queue({given!r}): "
                          f"a relative path, resolved in this working directory "
                          f"({os.getcwd()}); give the app an absolute path, or --db")
    if opened and os.path.abspath(db) not in opened:
        return db, (f"--app {app} opens {', '.join(opened)}, but this serves "
                    f"{os.path.abspath(db)}: jobs the app enqueues there will not run here")
    return db, None


def _format_age(seconds):
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def format_status(status, path):
    """The readable `status` table."""
    jobs = status["jobs"]
    lines = [f"litequeue {__version__}  {path}",
             "jobs        " + "  ".join(f"{state} {jobs[state]}" for state in STATES)]
    for name, counts in status["priorities"].items():
        if counts:
            lines.append(f"  {name:<9} " + "  ".join(f"{s} {n}" for s, n in sorted(counts.items())))
    memory = status["memory"]
    psi = memory.get("psi")
    lines.append(f"memory      {memory['level']} at {memory['pressure']:.1f}%"
                 + (f"  (psi some avg10 {psi['some_avg10']:.2f})" if psi else ""))
    for run in status["running"]:
        progress = run["progress"]
        shown = ("" if progress is None else f"  progress {progress['done']:g}"
                 + ("" if progress["total"] is None else f"/{progress['total']:g}"))
        lines.append(f"running     #{run['id']} {run['task']}  {run['priority']}  pid "
                     f"{run['pid'] or '?'}  rss {format_bytes(run['rss_bytes'])}{shown}")
    breakers = status["breakers"]
    lines.append("breakers    " + ("  ".join(f"{t}: {s}" for t, s in breakers.items())
                                   if breakers else "none"))
    lines.append(f"heartbeat   {_format_age(status['heartbeat_age'])}"
                 + (" ago" if status["heartbeat_age"] is not None else ""))
    sups = status["supervisors"]
    limits = {"cgroup": "a cgroup per job", "rlimit": "rlimits"}
    lines.append("supervisors " + ("  ".join(
        f"{s['id']} ({s['level']}, {limits.get(s['isolation'], s['isolation'])})"
        for s in sups) if sups else "none running"))
    if status["unserved"]:
        lines.append("unserved    " + ", ".join(status["unserved"])
                     + "  (queued, but no live supervisor serves these tasks)")
    return "\n".join(lines)


def _tail_offset(f, size, lines, block=1 << 16):
    """Where the last `lines` lines of an open file of `size` bytes begin (a last line
    without its newline counts), read backwards a block at a time."""
    if lines == 0:
        return size
    position, found = size, 0
    f.seek(max(0, size - 1))
    skip_last = f.read(1) == b"\n"       # the newline ending the last line ends no line before
    while position > 0:
        start = max(0, position - block)
        f.seek(start)
        chunk = f.read(position - start)
        end = len(chunk) - 1 if skip_last and position == size else len(chunk)
        index = chunk.rfind(b"\n", 0, end)
        while index >= 0:
            found += 1
            if found == lines:
                return start + index + 1
            index = chunk.rfind(b"\n", 0, index)
        position = start
    return 0


def print_output(queue, job_id, *, follow=False, tail=None, out, poll_s=0.1):
    """Copy a job's output to `out` (a binary stream) in chunks, never whole in memory; with
    follow, keep copying as it grows until the job is final (then what it wrote last)."""
    offset = None
    while True:
        final = follow and queue.get(job_id).state in FINAL_STATES   # before the last read
        path = queue.output_path(job_id)
        if path is not None:
            with open(path, "rb") as f:
                if offset is None:
                    size = os.fstat(f.fileno()).st_size
                    offset = 0 if tail is None else _tail_offset(f, size, tail)
                f.seek(offset)
                while chunk := f.read(1 << 16):
                    out.write(chunk)
                    offset += len(chunk)
                out.flush()
        if not follow or final:
            return
        time.sleep(poll_s)


def format_event(event):
    """One line of the `events` table: when (local time), job, task, kind, change, reason,
    pressure."""
    import datetime
    when = datetime.datetime.fromtimestamp(event["at"]).isoformat(timespec="seconds")
    change = f"{event['from_state'] or '-'} -> {event['to_state'] or '-'}"
    reason = " ".join(str(event["reason"] or "-").split())       # one line, whatever it held
    pressure = "-" if event["pressure"] is None else f"{event['pressure']:.1f}%"
    return (f"{when}  {event['job_id'] or '-':>8}  {event['task'] or '-':<16} "
            f"{event['kind']:<9} {change:<24} {reason}  {pressure}")


def _build_cli():
    import click

    db_help = ("database file [default: $LITEQUEUE_DB, else ./litequeue.db; for serve "
               "without either, the file the --app's Queue opens]")

    def remember_db(ctx, param, value):
        # `litequeue --db X status` and `litequeue jobs --db X list`: a group's --db is kept
        # in the context for the command below it (ctx.meta is shared down the chain).
        if value is not None:
            ctx.meta["litequeue.db"] = value

    def group_db_option(group):
        return click.option("--db", default=None, expose_value=False,
                            callback=remember_db, help=db_help)(group)

    def resolve_db(ctx, param, value):
        # The nearest --db wins (the command's, else a group's), then $LITEQUEUE_DB, then
        # ./litequeue.db; serve without any leaves None for served_file() to decide.
        value = value if value is not None else ctx.meta.get("litequeue.db")
        value = value if value is not None else os.environ.get("LITEQUEUE_DB") or None
        return value if value is not None or ctx.info_name == "serve" else default_db_path()

    def db_option(command):
        return click.option("--db", default=None, callback=resolve_db, help=db_help)(command)

    def open_queue(db, **options):
        # A command's waits on a locked file end at Ctrl-C (exit 130), not after the busy
        # timeout; serve keeps SQLite's own wait, its loop handles SIGINT itself.
        queue = Queue(db, **options)
        queue.conn.set_busy_handler(interruptible_busy_handler(queue.busy_timeout_s))
        return queue

    def echo_json(value):
        click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="litequeue")
    @group_db_option
    def cli():
        """litequeue: an embedded work queue in one SQLite file."""

    @cli.command()
    @db_option
    @click.option("--app", help="module or FILE.py whose Queue objects register the tasks; "
                                "without it, serve runs the built-in heartbeat and the demo "
                                "tasks (echo, sleep, hog, chunked, fail)")
    @click.option("--slots", type=int, default=2, show_default=True, help="jobs at once")
    @click.option("--memory-limit", default="400M", show_default=True,
                  help="per job, at least 1 MiB: 400M, 1G, 512MiB or bytes")
    @click.option("--memory-budget", help="for the supervisor and all its children, at least "
                                          "1 MiB: 400M, 1G, 512MiB or bytes")
    @click.option("--poll", default="0.25", show_default=True, help="memory poll interval (s)")
    @click.option("--psi/--no-psi", default=True, show_default=True,
                  help="also read memory as soon as a kernel PSI trigger reports stalls")
    @click.option("--thresholds", default="70,85,95", show_default=True,
                  help="skip,preempt,emergency (%)")
    @click.option("--margin", default="5", show_default=True, help="hysteresis (points)")
    @click.option("--hold", default="10", show_default=True,
                  help="seconds below a level (minus margin) before leaving it")
    @click.option("--grace", default="10", show_default=True,
                  help="seconds a job asked to stop has before it is killed")
    @click.option("--keep", help="purge final jobs older than this (e.g. 7d)")
    @click.option("--jobs-per-child", type=int, default=1, show_default=True,
                  help="jobs one child may run before it is replaced; above 1, a child is "
                       "reused after a clean finish and each job's memory limit is a soft rlimit "
                       "(with cgroups, the child's group keeps its limit, set again for a "
                       "job whose limit differs)")
    @click.option("--isolation", type=click.Choice(ISOLATION_MODES), default="auto",
                  show_default=True,
                  help="how hard a job's memory limit is: cgroup (a memory cgroup per job: the "
                       "kernel caps its whole process tree), rlimit (a per-process rlimit and "
                       "the RSS poll), auto (cgroup where the supervisor may make groups)")
    @click.option("--burst", is_flag=True, help="exit 0 once nothing runs and nothing is due")
    @click.option("--output-limit", default=DEFAULT_OUTPUT_LIMIT, show_default=True,
                  help="one job's output (400M, 1G, 512MiB or bytes); a job writing past "
                       "it is stopped")
    @click.option("--age", default="10m", show_default=True, metavar="DURATION",
                  help="a job waiting this long past its due time is started as one priority "
                       "higher, one more per further DURATION, up to high, so higher work "
                       "cannot starve it; memory levels still shed and preempt by its own "
                       "priority; 0: off")
    @click.option("--durability", type=click.Choice(["full", "normal"]), default="full",
                  show_default=True, help="synchronous=FULL or NORMAL")
    @click.option("--breaker-failures", type=int, default=BREAKER_FAILURES, show_default=True,
                  help="failures of a task within --breaker-window that open its breaker")
    @click.option("--breaker-window", default=str(BREAKER_WINDOW_S), show_default=True,
                  help="how far back failures count (30s, 5m or seconds)")
    @click.option("--breaker-cooldown", default=str(BREAKER_COOLDOWN_S), show_default=True,
                  help="how long an open breaker holds a task's jobs back before one trial "
                       "job runs (30s, 5m or seconds)")
    @click.option("--log-level", default="info", show_default=True, help="stderr log detail",
                  type=click.Choice(["debug", "info", "warning", "error"]))
    def serve(db, app, slots, memory_limit, memory_budget, poll, psi, thresholds, margin, hold,
              grace, keep, jobs_per_child, burst, output_limit, age, durability,
              breaker_failures, breaker_window, breaker_cooldown, log_level, isolation):
        """Run the supervisor: the tasks of --app, else the built-in heartbeat and demo
        tasks (echo, sleep, hog, chunked, fail)."""
        try:
            levels = [float(t) for t in thresholds.split(",")]
            margin_pct = float(margin)
        except ValueError:
            raise BadInput(f"--thresholds {thresholds!r} / --margin {margin!r}: numbers, "
                           f"like 70,85,95 and 5") from None
        policy = BreakerPolicy(breaker_failures, breaker_window, breaker_cooldown)
        # All input checked before the file is even opened, and used as checked.
        options = SupervisorOptions(slots=slots, memory_limit=memory_limit,
                                    memory_budget=memory_budget, poll=poll, thresholds=levels,
                                    margin=margin_pct, hold=hold, grace=grace, keep=keep,
                                    jobs_per_child=jobs_per_child, burst=burst,
                                    output_limit=output_limit, isolation=isolation, age=age,
                                    psi=psi)
        tasks, app_files = load_app_with_files(app) if app is not None else (None, [])
        db, warning = served_file(db, app, app_files)
        if warning:
            click.echo(f"litequeue: warning: {warning}", err=True)
        import threading
        if threading.active_count() > 1:
            click.echo(f"litequeue: warning: --app {app} started {threading.active_count() - 1} "
                       f"thread(s) at import; a child forked while one of them holds a lock "
                       f"can hang (it is then killed after {CHILD_START_DEADLINE_S:g}s). Start "
                       f"threads inside tasks instead.", err=True)
        resolved = Isolation.resolve(options.isolation)    # --isolation cgroup: exit 2 here
        queue = Queue(db, durable=durability == "full", breaker=policy)
        try:            # an unsafe directory is refused here (exit 4); one that cannot be
            check_output_dir(queue.output_dir, create=True)    # made is the log's to say
        except OSError:
            pass
        if tasks is None:
            tasks = builtin_tasks(queue, demos=True)
        import logging
        logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s litequeue[%(process)d] %(levelname)s %(message)s")
        supervisor = Supervisor(queue, options, tasks=tasks, isolation=resolved)
        return supervisor.run()

    @cli.command()
    @db_option
    @click.argument("task")
    @click.option("--payload", help="JSON")
    @click.option("--priority", help="critical, high, normal or low")
    @click.option("--unique", help="key: while a job with it waits or runs, print its id")
    @click.option("--delay", help="seconds or 30s, 5m ...")
    @click.option("--ttl", help="skip the job if it has not started this long after due")
    @click.option("--max-attempts", type=int,
                  help=f"runs before the job is dead "
                       f"[default: the task's, else {DEFAULT_MAX_ATTEMPTS}]")
    @click.option("--timeout", help="per run (30s, 5m or seconds)")
    @click.option("--memory-limit", help="per run, at least 1 MiB: 400M, 1G, 512MiB or bytes")
    @click.option("--wait", help="if the queue is full, wait up to this long for room (30s)")
    def enqueue(db, task, payload, priority, unique, delay, ttl, max_attempts, timeout,
                memory_limit, wait):
        """Add a job and print its id."""
        value = None if payload is None else loads_json(payload)
        options = dict(priority=priority, unique=unique, delay=delay, ttl=ttl,
                       max_attempts=max_attempts, timeout=timeout, memory_limit=memory_limit)
        _checked_input(task, value, flags=True, **options)   # all checked before the file opens
        options["wait"] = _checked_wait(wait, "--wait")
        queue = open_queue(db)
        import warnings
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always", UnknownTaskWarning)
            job_id = queue.enqueue(task, value, **options)
        # Said once the job is in (a typo that enqueued is worth a line in cron's mail; one
        # that failed anyway has its error to say).
        if any(issubclass(w.category, UnknownTaskWarning) for w in said):
            click.echo(f"litequeue: warning: task {task!r} is not in this file's catalogue "
                       f"(a typo?); enqueued with the global defaults", err=True)
        click.echo(job_id)

    @cli.command()
    @db_option
    @click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
    def status(db, as_json):
        """Counts, running jobs, memory level, breakers, heartbeat age."""
        queue = open_queue(db, create=False)
        result = queue.status()
        if as_json:
            echo_json(result)
        else:
            click.echo(format_status(result, queue.path))

    @cli.command()
    @db_option
    @click.option("--textfile", type=click.Path(dir_okay=False),
                  help="write them atomically to this file (node_exporter's textfile collector)")
    def metrics(db, textfile):
        """Print the Prometheus metrics, or write them to a file."""
        text = Queue(db, create=False).metrics_text()
        if textfile is None:
            click.echo(text, nl=False)
        else:
            write_atomically(textfile, text)

    @cli.group()
    @group_db_option
    def jobs():
        """Inspect and steer jobs."""

    @jobs.command("list")
    @db_option
    @click.option("--state", type=click.Choice(STATES), help="only jobs in this state")
    @click.option("--task", help="only jobs of this task")
    @click.option("--limit", type=int, default=50, show_default=True, help="show the newest N")
    @click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
    def jobs_list(db, state, task, limit, as_json):
        """Jobs, newest first."""
        found = open_queue(db, create=False).jobs(state=state, task=task, limit=limit)
        if as_json:
            echo_json([job.to_dict() for job in found])
            return
        click.echo(f"{'id':>8}  {'state':<9} {'priority':<8} {'attempts':>8}  task")
        for job in found:
            click.echo(f"{job.id:>8}  {job.state:<9} {job.priority:<8} "
                       f"{job.attempts:>3}/{job.max_attempts:<4}  {job.task}")

    @jobs.command("show")
    @db_option
    @click.argument("job_id")
    def jobs_show(db, job_id):
        """One job and its events, as JSON."""
        queue = open_queue(db, create=False)
        job = queue.get(job_id)
        echo_json({**job.to_dict(), "output_bytes": queue.output_bytes(job.id),
                   "events": queue.events(job_id=job.id)})

    @jobs.command("output")
    @db_option
    @click.argument("job_id")
    @click.option("--follow", "-f", is_flag=True,
                  help="keep printing as it grows; exit 0 once the job is final")
    @click.option("--tail", type=int, help="only the last N lines")
    def jobs_output(db, job_id, follow, tail):
        """Print a job's output (its bytes as written)."""
        if tail is not None and tail < 0:
            raise BadInput(f"--tail {tail}: a number of lines, 0 or more")
        queue = open_queue(db, create=False)
        job = queue.get(job_id)
        print_output(queue, job.id, follow=follow, tail=tail, out=sys.stdout.buffer)

    @jobs.command("cancel")
    @db_option
    @click.argument("job_id")
    def jobs_cancel(db, job_id):
        """Cancel a queued job, or ask a running one to stop."""
        state = open_queue(db, create=False).cancel(job_id)
        click.echo("cancelled" if state == CANCELLED else
                   "cancel requested: its supervisor will stop it")

    @jobs.command("retry")
    @db_option
    @click.argument("job_id")
    def jobs_retry(db, job_id):
        """Put a dead, skipped or cancelled job back to queued."""
        click.echo(open_queue(db, create=False).retry(job_id))

    @cli.command()
    @db_option
    @click.option("--job", "job_id", help="only this job's events")
    @click.option("--kind", help="only events of this kind: job, decision, level, breaker")
    @click.option("--since", help="only events this recent, e.g. 30m, 2h, 7d")
    @click.option("--limit", type=int, default=1000, show_default=True,
                  help="show the latest N")
    @click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
    def events(db, job_id, kind, since, limit, as_json):
        """State changes, the governor's decisions and levels, breaker transitions."""
        since_s = None if since is None else parse_duration(since, "--since")
        if job_id is not None:
            job_id = Queue._job_id(job_id)
        queue = open_queue(db, create=False)
        if job_id is not None:
            queue.get(job_id)                   # "no job N", not an empty answer
        found = queue.events(job_id=job_id, kind=kind, limit=limit, newest=True,
                             since=None if since_s is None else now() - since_s)
        if as_json:
            echo_json(found)
            return
        click.echo(f"{'time':<19}  {'job':>8}  {'task':<16} {'kind':<9} {'change':<24} "
                   f"reason  pressure")
        for event in found:
            click.echo(format_event(event))

    @cli.group()
    @group_db_option
    def breaker():
        """Inspect and reset circuit breakers."""

    @breaker.command("list")
    @db_option
    @click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
    def breaker_list(db, as_json):
        """Every task's breaker."""
        found = open_queue(db, create=False).breakers()
        if as_json:
            echo_json(found)
            return
        for b in found:
            click.echo(f"{b['task']:<30} {b['state']:<9} failures {b['failures']}")

    @breaker.command("reset")
    @db_option
    @click.argument("task")
    def breaker_reset(db, task):
        """Close a task's breaker."""
        before = open_queue(db, create=False).reset_breaker(check_name(task))
        click.echo(f"{task}: {before} -> closed")

    @cli.command()
    @db_option
    @click.option("--older-than", required=True, help="e.g. 7d: age since the job finished")
    def purge(db, older_than):
        """Delete final jobs older than that, with their events and checkpoints."""
        seconds = parse_duration(older_than, "--older-than")
        click.echo(f"purged {open_queue(db, create=False).purge(seconds)} jobs")

    @cli.command()
    @db_option
    @click.option("--bind", default=DASHBOARD_BIND, show_default=True,
                  help="HOST:PORT; an address other than loopback also needs --token")
    @click.option("--token", envvar="LITEQUEUE_DASHBOARD_TOKEN",
                  help="every request must carry it (Authorization: Bearer, or ?token=) "
                       "[default: $LITEQUEUE_DASHBOARD_TOKEN]")
    def dashboard(db, bind, token):
        """Serve the read-only status page, /api/status, /api/jobs/ID and /metrics."""
        host, port = parse_bind(bind)
        if not token and not is_loopback(host):
            raise BadInput(f"--bind {bind} is reachable from other machines, and payloads can "
                           f"hold secrets: give --token (or $LITEQUEUE_DASHBOARD_TOKEN)")
        queue = Queue(db, create=False)
        try:
            serve_dashboard(queue, host, port, token or None,
                            announce=lambda url: click.echo(f"litequeue: dashboard at {url}"))
        except OSError as exc:
            raise BadInput(f"--bind {bind}: {exc.strerror or exc}") from None
        finally:
            queue.close()

    return cli


def main(argv=None):
    """The command line; returns the exit code."""
    import click
    cli = _build_cli()
    try:
        result = cli.main(args=argv, prog_name="litequeue", standalone_mode=False)
        return result if isinstance(result, int) else EXIT_OK
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as exc:   # a bare group (click
        # >= 8.2): its help, as usage, without an "error:" in front
        print(exc.format_message(), file=sys.stderr)
        return EXIT_BAD_INPUT
    except click.ClickException as exc:
        print(f"litequeue: error: {exc.format_message()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Error as exc:
        print(f"litequeue: error: {exc}", file=sys.stderr)
        return exc.exit_code

