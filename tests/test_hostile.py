"""Hostile input, met the way a user or an attacker would present it: random bytes, a truncated
copy and a zero-length file as the database; a read-only file and a read-only directory; a
payload nested 10,000 deep; NaN, infinite and huge numbers; task names and unique keys made of
quotes, SQL and junk; job rows that name `os.system` or hold JSON that does not parse.

Each gets a clear one-line error with the exit code the contract names (2 bad input, 4 database
unusable), no traceback, and leaves the file as it was; nothing named in the file is imported
or run."""

import hashlib
import json
import os
import random
import subprocess
import sys
import time

import apsw
import pytest

import litequeue
from conftest import ROOT, file_digest, integrity_ok, run_cli, start_serve, wait_for, write_app

IS_ROOT = os.geteuid() == 0


# -- helpers -------------------------------------------------------------------------------

def assert_error(result, code, *, mentions=()):
    """Exit `code`, one line on stderr in litequeue's own words, no traceback, no stdout."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("litequeue: error: "), result.stderr
    assert result.stdout == "", result.stdout
    for text in mentions:
        assert text in result.stderr, (text, result.stderr)


def queue_file(path, jobs=3):
    """A valid queue file holding `jobs` echo jobs; returns their ids. The WAL is folded back
    into the file on close, so the file alone is the whole database."""
    with litequeue.Queue(str(path)) as q:
        return q.enqueue_many([("echo", {"i": i, "pad": "x" * 400}) for i in range(jobs)])


def rows(path, table="jobs", columns="*"):
    """Rows of a table, read straight from the file with a read-only apsw connection."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute(f"SELECT {columns} FROM {table} ORDER BY 1").fetchall()
    finally:
        conn.close()


def insert_job(path, task, payload="null", state="queued", **columns):
    """A job row written straight into the file, as a hostile writer would."""
    at = time.time()
    values = {"task": task, "payload": payload, "priority": 2, "state": state,
              "max_attempts": 3, "created_at": at, "due_at": at, **columns}
    conn = apsw.Connection(str(path))
    try:
        conn.execute(f"INSERT INTO jobs ({', '.join(values)})"
                     f" VALUES ({', '.join('?' * len(values))})", list(values.values()))
        return conn.last_insert_rowid()
    finally:
        conn.close()


def mount_tmpfs(directory, options="size=4m"):
    """Mount a small tmpfs on directory, or skip the test saying why not."""
    if not IS_ROOT:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs was refused: {done.stderr.strip()}")


def unmount(target):
    if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def remount_read_only(target, *extra):
    done = subprocess.run(["mount", "-o", ",".join(["remount", "ro", *extra]), str(target)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"remounting read-only was refused: {done.stderr.strip()}")


# -- a database file that is not one ---------------------------------------------------------

def _random_bytes(directory):
    path = directory / "q.db"
    path.write_bytes(random.Random(20240601).randbytes(16384))
    return path


def _valid_bytes(directory):
    good = directory / "good.db"
    queue_file(good, jobs=40)
    data = good.read_bytes()
    good.unlink()
    assert len(data) > 4 * 4096          # several pages: a truncation loses real data
    return data


def _truncated_half(directory):
    path = directory / "q.db"
    path.write_bytes((data := _valid_bytes(directory))[:len(data) // 2])
    return path


def _first_page_only(directory):
    """Header and schema page intact (application_id and user_version read as ours), every
    table page gone."""
    path = directory / "q.db"
    path.write_bytes(_valid_bytes(directory)[:4096])
    return path


def _zero_length(directory):
    path = directory / "q.db"
    path.write_bytes(b"")
    return path


def _foreign_sqlite(directory):
    path = directory / "q.db"
    conn = apsw.Connection(str(path))
    conn.execute("PRAGMA journal_mode = WAL")     # closed cleanly: no WAL left behind
    conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, owner TEXT);"
                 "INSERT INTO accounts (owner) VALUES ('ada')")
    conn.close()
    return path


BROKEN_FILES = {"random-bytes": _random_bytes, "truncated-half": _truncated_half,
                "first-page-only": _first_page_only, "zero-length": _zero_length,
                "foreign-sqlite": _foreign_sqlite}

COMMANDS = {
    "enqueue": ["enqueue", "echo", "--payload", '{"a": 1}'],
    "status": ["status", "--json"],
    "jobs-list": ["jobs", "list"],
    "jobs-show": ["jobs", "show", "1"],
    "serve": ["serve", "--burst"],
    "purge": ["purge", "--older-than", "1d"],
    "breaker-list": ["breaker", "list"],
}

# Every command on random bytes and on a truncated copy; the first-page truncation on the
# commands that write; the zero-length and the foreign file on the commands test_cli.py does
# not already run on them.
BROKEN_CASES = (
    [("random-bytes", c) for c in COMMANDS] + [("truncated-half", c) for c in COMMANDS]
    + [("first-page-only", c) for c in ("enqueue", "serve")]
    + [(k, c) for k in ("zero-length", "foreign-sqlite")
       for c in ("jobs-show", "serve", "purge", "breaker-list")])


@pytest.mark.parametrize("kind, command", BROKEN_CASES,
                         ids=[f"{k}-{c}" for k, c in BROKEN_CASES])
def test_a_file_that_is_not_a_queue_is_exit_4_and_left_alone(tmp_path, kind, command):
    directory = tmp_path / "d"
    directory.mkdir()
    path = BROKEN_FILES[kind](directory)
    before = path.read_bytes()
    result = run_cli(*COMMANDS[command], db=path)
    assert_error(result, 4, mentions=[str(path)])
    assert path.read_bytes() == before
    assert sorted(os.listdir(directory)) == ["q.db"]        # no -wal, -shm or temp file left


def _crashed_wal_file(path, kind):
    """A WAL-mode file whose writer died with commits still in the WAL (not checkpointed):
    another program's database, or a litequeue file from a newer version."""
    code = f"""
import os, sys
import apsw
sys.path.insert(0, {ROOT!r})
import litequeue
path = {str(path)!r}
if {kind!r} == "foreign":
    conn = apsw.Connection(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, owner TEXT)")
    for i in range(50):
        conn.execute("INSERT INTO accounts (owner) VALUES (?)", ("ada" * 30,))
else:
    litequeue.Queue(path).close()
    conn = apsw.Connection(path)
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("PRAGMA user_version = {litequeue.SCHEMA_VERSION + 1}")
    conn.execute("INSERT INTO meta (key, value) VALUES ('from', 'the future')")
os._exit(0)          # the writer dies: its commits stay in the WAL
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert os.path.getsize(f"{path}-wal") > 0


@pytest.mark.parametrize("command", ["enqueue", "status"])
@pytest.mark.parametrize("kind", ["foreign", "newer"])
def test_a_refused_file_with_commits_in_its_wal_keeps_them_there(tmp_path, kind, command):
    """Refusing a file must not checkpoint its WAL into it: closing the last connection to a
    WAL file does that by default, rewriting a file litequeue said it would not touch."""
    path = tmp_path / "q.db"
    _crashed_wal_file(path, kind)
    before = _sizes_and_digests(tmp_path)
    assert set(before) >= {"q.db", "q.db-wal"}
    result = run_cli(*COMMANDS[command], db=path)
    assert_error(result, 4, mentions=[str(path)])
    after = _sizes_and_digests(tmp_path)
    assert {n: after.get(n) for n in ("q.db", "q.db-wal")} == {
        n: before[n] for n in ("q.db", "q.db-wal")}


def _sizes_and_digests(directory):
    """{name: (size, sha256)} of the files in directory."""
    return {p.name: (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()[:16])
            for p in directory.iterdir() if p.is_file()}


# -- read-only: a file, and a whole directory ------------------------------------------------

@pytest.fixture
def read_only_directory(tmp_path):
    """(path, job ids) of a valid queue file in a directory nobody may write: a tmpfs
    remounted read-only when root (chmod does not stop root), else chmod."""
    directory = tmp_path / "ro"
    directory.mkdir()
    path = directory / "q.db"
    if IS_ROOT:
        mount_tmpfs(directory)
    try:
        ids = queue_file(path)
        if IS_ROOT:
            remount_read_only(directory)
        else:
            os.chmod(path, 0o444)
            os.chmod(directory, 0o555)
        yield path, ids
    finally:
        if IS_ROOT:
            unmount(directory)
        else:
            os.chmod(directory, 0o755)


@pytest.fixture
def read_only_file(tmp_path):
    """(path, job ids) of a valid queue file nobody may write, in a writable directory: the
    file bind-mounted read-only onto itself when root, else chmod 0444."""
    path = tmp_path / "q.db"
    ids = queue_file(path)
    if not IS_ROOT:
        os.chmod(path, 0o444)
        yield path, ids
        return
    done = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mount --bind was refused: {done.stderr.strip()}")
    try:
        remount_read_only(path, "bind")
        yield path, ids
    finally:
        unmount(path)


WRITES = {
    "enqueue": ["enqueue", "echo"],
    "serve": ["serve", "--burst"],
    "purge": ["purge", "--older-than", "1d"],
    "jobs-cancel": ["jobs", "cancel", "1"],
    "breaker-reset": ["breaker", "reset", "echo"],
}


def test_a_read_only_directory_refuses_writes_with_exit_4(read_only_directory):
    path, ids = read_only_directory
    before, listing = file_digest(path), sorted(os.listdir(path.parent))
    problems = []
    for name, args in WRITES.items():
        result = run_cli(*args, db=path)
        try:
            assert_error(result, 4, mentions=[str(path)])
        except AssertionError as exc:
            problems.append((name, exc))
    new_file = path.parent / "new.db"                       # nor can a file be created there
    try:
        assert_error(run_cli("enqueue", "echo", db=new_file), 4, mentions=[str(new_file)])
    except AssertionError as exc:
        problems.append(("enqueue-new-file", exc))
    assert not problems, problems
    assert file_digest(path) == before
    assert sorted(os.listdir(path.parent)) == listing


def test_a_read_only_directory_reads_or_says_why_not(read_only_directory):
    """SQLite cannot open a WAL file where it may not create the -shm beside it: reading is
    then either served (0) or refused as an unwritable database (4), in one line."""
    path, ids = read_only_directory
    status = run_cli("status", "--json", db=path)
    listed = run_cli("jobs", "list", "--json", db=path)
    for result in (status, listed):
        if result.returncode != 0:
            assert_error(result, 4, mentions=[str(path)])
    if status.returncode == 0:
        assert json.loads(status.stdout)["jobs"]["queued"] == len(ids)
    if listed.returncode == 0:
        assert sorted(job["id"] for job in json.loads(listed.stdout)) == sorted(ids)


def test_a_read_only_file_serves_reads_and_refuses_writes(read_only_file):
    path, ids = read_only_file
    before = file_digest(path)
    problems = []
    for name in ("enqueue", "serve", "purge"):
        result = run_cli(*WRITES[name], db=path)
        try:
            assert_error(result, 4, mentions=[str(path), "read-only"])
        except AssertionError as exc:
            problems.append((name, exc))
    assert not problems, problems
    status = run_cli("status", "--json", db=path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["jobs"]["queued"] == len(ids)
    listed = run_cli("jobs", "list", "--json", db=path)
    assert listed.returncode == 0, listed.stderr
    assert sorted(job["id"] for job in json.loads(listed.stdout)) == sorted(ids)
    shown = run_cli("jobs", "show", ids[0], db=path)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["payload"] == {"i": 0, "pad": "x" * 400}
    breakers = run_cli("breaker", "list", "--json", db=path)
    assert breakers.returncode == 0 and json.loads(breakers.stdout) == [], breakers.stderr
    assert file_digest(path) == before


# -- a payload nested 10,000 deep ------------------------------------------------------------

DEPTH = 10_000


def nested_list(depth=DEPTH):
    outer = inner = []
    for _ in range(depth - 1):
        inner.append([])
        inner = inner[0]
    return outer


def nested_dict(depth=DEPTH):
    outer = inner = {}
    for _ in range(depth - 1):
        inner["a"] = {}
        inner = inner["a"]
    return outer


@pytest.mark.parametrize("text", ["[" * DEPTH + "]" * DEPTH,
                                  '{"a":' * DEPTH + "1" + "}" * DEPTH], ids=["list", "object"])
def test_cli_payload_nested_10000_deep_is_bad_input(db_path, text):
    queue_file(db_path)
    before = file_digest(db_path)
    result = run_cli("enqueue", "echo", "--payload", text, db=db_path)
    assert_error(result, 2, mentions=["payload"])
    assert file_digest(db_path) == before


@pytest.mark.parametrize("payload", [nested_list, nested_dict], ids=["list", "dict"])
def test_api_payload_nested_10000_deep_is_bad_payload(queue, payload):
    queue.enqueue("echo", {"before": True})
    before = rows(queue.path)
    with pytest.raises(litequeue.BadPayload, match="nested"):
        queue.enqueue("echo", payload())
    with pytest.raises(litequeue.BadPayload):              # all or nothing: the good one too
        queue.enqueue_many([("echo", {"ok": 1}), ("echo", payload())])
    assert rows(queue.path) == before


def test_a_result_or_checkpoint_nested_10000_deep_is_refused_and_the_job_keeps_running(queue):
    job_id = queue.enqueue("echo")
    job = queue.claim("w1")[0]
    queue.save_checkpoint(job_id, "w1", job.attempts, {"page": 3})
    with pytest.raises(litequeue.BadPayload):
        queue.save_checkpoint(job_id, "w1", job.attempts, nested_dict())
    with pytest.raises(litequeue.BadPayload):
        queue.complete(job_id, "w1", job.attempts, nested_list())
    after = queue.get(job_id)
    assert (after.state, after.checkpoint, after.result) == ("running", {"page": 3}, None)


# -- NaN, infinity and huge numbers ---------------------------------------------------------

HUGE = "9" * 30

NUMBER_CASES = [
    ("delay-inf", ["enqueue", "echo", "--delay", "inf"]),
    ("delay-1e309", ["enqueue", "echo", "--delay", "1e309"]),
    ("ttl-nan", ["enqueue", "echo", "--ttl", "NaN"]),
    ("ttl-huge", ["enqueue", "echo", "--ttl", HUGE]),
    ("timeout-minus-inf", ["enqueue", "echo", "--timeout", "-inf"]),
    ("timeout-1e309", ["enqueue", "echo", "--timeout", "1e309"]),
    ("memory-limit-nan", ["enqueue", "echo", "--memory-limit", "nan"]),
    ("memory-limit-huge", ["enqueue", "echo", "--memory-limit", HUGE + "T"]),
    ("max-attempts-1e309", ["enqueue", "echo", "--max-attempts", "1e309"]),
    ("max-attempts-2**31", ["enqueue", "echo", "--max-attempts", str(2**31)]),
    ("serve-poll-nan", ["serve", "--burst", "--poll", "nan"]),
    ("serve-poll-zero", ["serve", "--burst", "--poll", "0"]),
    ("serve-grace-inf", ["serve", "--burst", "--grace", "inf"]),
    ("serve-hold-1e309", ["serve", "--burst", "--hold", "1e309"]),
    ("serve-memory-budget-inf", ["serve", "--burst", "--memory-budget", "Infinity"]),
    ("serve-memory-budget-huge", ["serve", "--burst", "--memory-budget", HUGE]),
    ("serve-thresholds-nan", ["serve", "--burst", "--thresholds", "nan,85,95"]),
    ("serve-margin-inf", ["serve", "--burst", "--margin", "inf"]),
    ("purge-older-than-1e309", ["purge", "--older-than", "1e309"]),
]


@pytest.mark.parametrize("args", [a for _, a in NUMBER_CASES], ids=[n for n, _ in NUMBER_CASES])
def test_cli_nan_infinite_and_huge_numbers_are_bad_input(db_path, args):
    queue_file(db_path)
    before = file_digest(db_path)
    result = run_cli(*args, db=db_path, timeout=30)
    assert_error(result, 2)
    assert file_digest(db_path) == before


NAN, INF = float("nan"), float("inf")
API_NUMBER_CASES = (
    [(option, value) for option in ("delay", "ttl", "timeout")
     for value in (NAN, INF, -INF, 1e13, 10**400, "1e309", "Infinity", "nan")]
    + [("memory_limit", value) for value in (NAN, INF, 10**30, 2**62, "1e309", "inf")]
    + [("max_attempts", value) for value in (NAN, INF, 10**30, 2**31, 1.5)]
)


@pytest.mark.parametrize("option, value", API_NUMBER_CASES,
                         ids=[f"{o}-{v!r:.12}" for o, v in API_NUMBER_CASES])
def test_api_nan_infinite_and_huge_numbers_are_bad_input(queue, option, value):
    queue.enqueue("echo")
    before = rows(queue.path)
    with pytest.raises(litequeue.BadInput):
        queue.enqueue("echo", **{option: value})
    with pytest.raises(litequeue.BadInput):
        queue.enqueue_many([{"task": "echo"}, {"task": "echo", option: value}])
    assert rows(queue.path) == before


SUPERVISOR_NUMBER_CASES = [
    (option, value) for option in ("poll", "grace", "hold", "keep")
    for value in (NAN, INF, 10**400)] + [
    (option, value) for option in ("memory_limit", "memory_budget")
    for value in (NAN, INF, 10**30, "1e309")] + [
    ("slots", NAN), ("slots", 10**30), ("thresholds", (NAN, 85, 95)),
    ("thresholds", (70, INF, 95)), ("margin", NAN), ("margin", INF)]


@pytest.mark.parametrize("option, value", SUPERVISOR_NUMBER_CASES,
                         ids=[f"{o}-{v!r:.12}" for o, v in SUPERVISOR_NUMBER_CASES])
def test_api_supervisor_refuses_nan_infinite_and_huge_numbers(queue, option, value):
    with pytest.raises(litequeue.BadInput):
        litequeue.Supervisor(queue, **{option: value})


@pytest.mark.parametrize("option, value", [("timeout", INF), ("ttl", NAN),
                                           ("memory_limit", 10**30), ("max_attempts", INF)])
def test_api_task_declaration_refuses_nan_infinite_and_huge_numbers(queue, option, value):
    before = rows(queue.path, "tasks")
    with pytest.raises(litequeue.BadInput):
        @queue.task(**{option: value})
        def numbers(ctx):
            return None
    assert "numbers" not in queue.registry
    assert rows(queue.path, "tasks") == before


# -- task names and unique keys ---------------------------------------------------------------

VALID_NAMES = {
    "quotes": "it's \"quoted\" `twice`",
    "sql-drop": "'; DROP TABLE jobs; --",
    "sql-union": "x' UNION SELECT name FROM sqlite_schema --",
    "format": "%s %d %n {0} {} %(x)s",
    "unicode": "tâche-日本語-🚀-עברית",
    "controls": "a\tb\x01\x1b[31m\x7fc\r",
    "newline": "line one\nline two",
    "ascii-junk": bytes(range(1, 128)).decode("ascii"),
    "longest": "🚀" * litequeue.MAX_NAME_CHARS,            # 200 characters, 800 bytes
}


def test_cli_stores_hostile_names_and_keys_exactly(db_path):
    queue_file(db_path, jobs=1)
    ids = {}
    for label, name in VALID_NAMES.items():
        result = run_cli("enqueue", name, "--unique", name, db=db_path)
        assert result.returncode == 0, (label, result.stderr)
        assert "Traceback" not in result.stderr
        ids[label] = int(result.stdout)
    listed = run_cli("jobs", "list", "--json", "--limit", "100", db=db_path)
    assert listed.returncode == 0, listed.stderr
    by_id = {job["id"]: job for job in json.loads(listed.stdout)}
    for label, name in VALID_NAMES.items():
        assert (by_id[ids[label]]["task"], by_id[ids[label]]["unique_key"]) == (name, name), label
    again = run_cli("enqueue", "echo", "--unique", VALID_NAMES["sql-drop"], db=db_path)
    assert again.returncode == 0 and int(again.stdout) == ids["sql-drop"]   # the exact key
    only = run_cli("jobs", "list", "--json", "--task", VALID_NAMES["sql-union"], db=db_path)
    assert [job["id"] for job in json.loads(only.stdout)] == [ids["sql-union"]]
    assert len(rows(db_path)) == 1 + len(VALID_NAMES)          # no table dropped, none added
    assert integrity_ok(db_path)


INVALID_CLI_NAMES = [
    ("task-too-long", ["enqueue", "x" * (litequeue.MAX_NAME_CHARS + 1)]),
    ("task-not-utf8", ["enqueue", "junk-\udcff\udcfe\udc80"]),   # raw bytes 0xff 0xfe 0x80
    ("unique-not-utf8", ["enqueue", "echo", "--unique", "\udcc3("]),        # bytes C3 28
    ("unique-too-long", ["enqueue", "echo", "--unique", "k" * (litequeue.MAX_NAME_CHARS + 1)]),
    ("task-empty", ["enqueue", ""]),
]


@pytest.mark.parametrize("args", [a for _, a in INVALID_CLI_NAMES],
                         ids=[n for n, _ in INVALID_CLI_NAMES])
def test_cli_refuses_names_it_cannot_store(db_path, args):
    queue_file(db_path)
    before = file_digest(db_path)
    result = run_cli(*args, db=db_path)
    assert_error(result, 2)
    assert file_digest(db_path) == before


@pytest.mark.parametrize("label", list(VALID_NAMES))
def test_api_stores_hostile_names_and_keys_exactly(queue, label):
    name = VALID_NAMES[label]
    job_id = queue.enqueue(name, {"k": name}, unique=name)
    assert queue.enqueue("echo", unique=name) == job_id             # the same key holds
    assert queue.enqueue("echo", unique=name[:-1] + "\u2603") != job_id   # one character off
    job = queue.get(job_id)
    assert (job.task, job.unique_key, job.payload) == (name, name, {"k": name})
    assert [j.id for j in queue.jobs(task=name)] == [job_id]
    assert name in queue.status()["unserved"]


@pytest.mark.parametrize("task, unique", [
    ("echo", "key\0with-nul"), ("echo", "k" * (litequeue.MAX_NAME_CHARS + 1)),
    ("echo", b"bytes-key"), ("echo", "\udcff"), (b"echo", None), ("\0", None),
    ("'; DROP TABLE jobs; --\0", None),
], ids=["unique-nul", "unique-too-long", "unique-bytes", "unique-surrogate", "task-bytes",
        "task-nul", "task-sql-nul"])
def test_api_refuses_names_it_cannot_store(queue, task, unique):
    queue.enqueue("echo")
    before = rows(queue.path)
    with pytest.raises(litequeue.BadInput):
        queue.enqueue(task, unique=unique)
    assert rows(queue.path) == before


# -- rows that name code: nothing is imported or run ------------------------------------------

def hostile_rows(tmp_path, db):
    """Queued jobs naming callables an attacker would like run, each with a payload that
    leaves a marker file if it ever is; a module beside the app that marks its import; and a
    catalogue row for os.system."""
    marker = tmp_path / "MARKER"
    (tmp_path / "lq_evil.py").write_text(
        f"open({str(marker)!r} + '-imported', 'w').close()\n"
        f"def run(*args, **kwargs):\n    open({str(marker)!r} + '-run', 'w').close()\n")
    named = {
        "os.system": json.dumps(f"touch {marker}-system"),
        "posix.system": json.dumps(f"touch {marker}-posix"),
        "builtins.eval": json.dumps(f"open({str(marker)!r} + '-eval', 'w')"),
        "builtins.exec": json.dumps(f"open({str(marker)!r} + '-exec', 'w')"),
        "subprocess.call": json.dumps(["touch", f"{marker}-call"]),
        "__import__": json.dumps("lq_evil"),
        "lq_evil.run": json.dumps({"cmd": "run"}),
        "lq_evil:run": "null",
    }
    ids = {task: insert_job(db, task, payload, priority=0) for task, payload in named.items()}
    conn = apsw.Connection(str(db))
    conn.execute("INSERT INTO tasks (name, priority, max_attempts, updated_at)"
                 " VALUES ('os.system', 0, 3, ?)", (time.time(),))
    conn.close()
    return ids, marker


def assert_nothing_ran(tmp_path, db, ids):
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("MARKER")] == []
    with litequeue.Queue(str(db)) as q:
        for task, job_id in ids.items():
            job = q.get(job_id)
            assert (job.task, job.state, job.attempts) == (task, "queued", 0)


@pytest.mark.parametrize("with_app", [False, True], ids=["builtin-tasks", "with-app"])
def test_rows_naming_code_are_never_imported_or_run(tmp_path, with_app):
    db = tmp_path / "q.db"
    echo_payload = {"__class__": "os.system", "__reduce__": f"touch {tmp_path}/MARKER-echo"}
    with litequeue.Queue(str(db)) as q:
        served = q.enqueue("echo", echo_payload)
    ids, _ = hostile_rows(tmp_path, db)
    args = ["serve", "--burst", "--poll", "0.05"]
    if with_app:
        app = write_app(tmp_path, """
            @queue.task
            def legit(ctx):
                return "legit"
        """)
        args += ["--app", app]
        with litequeue.Queue(str(db)) as q:
            served = q.enqueue("legit")
    result = run_cli(*args, db=db, cwd=tmp_path, env={"LITEQUEUE_DB": str(db)}, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_ran(tmp_path, db, ids)
    with litequeue.Queue(str(db)) as q:
        done = q.get(served)
    assert done.state == "done"
    assert done.result == (echo_payload if not with_app else "legit")   # data, never code


def test_a_live_supervisor_lists_rows_naming_code_as_unserved(tmp_path):
    db = tmp_path / "q.db"
    litequeue.Queue(str(db)).close()
    ids, _ = hostile_rows(tmp_path, db)
    supervisor = start_serve("--poll", "0.05", db=db, cwd=tmp_path)
    try:
        observer = litequeue.Queue(str(db))
        wait_for(lambda: observer.live_supervisors(), timeout=20)
        observer.close()
        status = run_cli("status", "--json", db=db)
        assert status.returncode == 0, status.stderr
        reported = json.loads(status.stdout)
        assert len(reported["supervisors"]) == 1
        assert reported["unserved"] == sorted(ids)
        assert reported["jobs"]["queued"] == len(ids)
    finally:
        supervisor.terminate()
        out, err = supervisor.communicate(timeout=30)
    assert supervisor.returncode == 0, err
    assert "Traceback" not in err
    assert_nothing_ran(tmp_path, db, ids)


# -- rows whose JSON does not parse -------------------------------------------------------------

BAD_STORED_JSON = {
    "payload-not-json": dict(payload="{not json"),
    "payload-binary": dict(payload=b"\x00\xff\xfe"),
    "payload-10000-deep": dict(payload="[" * DEPTH + "]" * DEPTH),
    "result-not-json": dict(state="done", result="{bad", finished_at=time.time()),
    "checkpoint-not-json": dict(checkpoint="[1,", checkpoint_at=time.time()),
}


@pytest.mark.parametrize("kind", list(BAD_STORED_JSON))
def test_reading_a_row_whose_json_does_not_parse_does_not_crash(db_path, kind):
    """`jobs show` and `jobs list` on such a row: shown (0), or refused as a corrupt database
    (4) in one line; never a traceback, and the file is not changed by looking."""
    good = queue_file(db_path, jobs=1)[0]
    bad = insert_job(db_path, "echo", **BAD_STORED_JSON[kind])
    before = file_digest(db_path)
    for args in (["jobs", "show", bad], ["jobs", "list", "--json"]):
        result = run_cli(*args, db=db_path)
        assert "Traceback" not in result.stderr, (args, result.stderr)
        assert result.returncode in (0, 4), (args, result.returncode, result.stderr)
        if result.returncode == 4:
            assert_error(result, 4)
        elif args[1] == "show":
            assert json.loads(result.stdout)["id"] == bad
        else:
            assert {job["id"] for job in json.loads(result.stdout)} == {good, bad}
    assert file_digest(db_path) == before


def test_status_with_rows_whose_json_does_not_parse(db_path):
    queue_file(db_path, jobs=1)
    for columns in BAD_STORED_JSON.values():
        insert_job(db_path, "echo", **columns)
    result = run_cli("status", "--json", db=db_path)
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)["jobs"]
    assert (counts["queued"], counts["done"]) == (5, 1)


def test_a_supervisor_meeting_rows_whose_json_does_not_parse_keeps_serving(db_path):
    """Undecodable rows of a served task cannot run: they end (dead, with why), the good job
    beside them runs, and the supervisor neither crashes nor strands anything in `running`."""
    good = queue_file(db_path, jobs=1)[0]
    bad = [insert_job(db_path, "echo", **BAD_STORED_JSON[kind])
           for kind in ("payload-not-json", "payload-binary", "payload-10000-deep")]
    result = run_cli("serve", "--burst", "--poll", "0.05", db=db_path, timeout=30)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    states = dict(rows(db_path, columns="id, state"))
    assert states[good] == "done"
    assert all(states[job_id] in ("dead", "skipped", "cancelled") for job_id in bad), states
    assert integrity_ok(db_path)
