"""The command line: click's CliRunner for most cases (litequeue._build_cli() for behaviour,
litequeue.main() for exit codes and error lines), and a few real `python litequeue.py`
subprocesses the way cron and systemd run it."""

import datetime
import json
import os
import re
import sys
import types

import apsw
import pytest
from click.testing import CliRunner
from freezegun import freeze_time

import litequeue
from conftest import file_digest, run_cli

T0 = 1_800_000_000.0
STATES = ("queued", "running", "done", "dead", "cancelled", "skipped")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No $LITEQUEUE_DB from the outside, and a cwd where a default ./litequeue.db is ours."""
    monkeypatch.delenv("LITEQUEUE_DB", raising=False)
    monkeypatch.chdir(tmp_path)


# -- helpers -----------------------------------------------------------------------------

def frozen(at):
    return freeze_time(datetime.datetime.fromtimestamp(at, datetime.timezone.utc))


def invoke(*args, env=None):
    """The click command group in-process; litequeue errors surface as result.exception."""
    return CliRunner().invoke(litequeue._build_cli(), [str(a) for a in args], env=env)


def main(*args, env=None):
    """litequeue.main() in-process under CliRunner's isolation: the real exit code mapping
    and the real stderr line."""
    runner = CliRunner()
    with runner.isolation(env=env) as (out, err, _):
        try:
            code = litequeue.main([str(a) for a in args])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    return types.SimpleNamespace(exit_code=code, stdout=out.getvalue().decode(),
                                 stderr=err.getvalue().decode())


def settle(path):
    """Fold any WAL into the file so that a hash taken now is stable."""
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        try:
            conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE)
        except apsw.Error:
            return
        try:
            if conn.execute("PRAGMA journal_mode").fetchall() == [("wal",)]:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except apsw.Error:
            pass
        finally:
            conn.close()


def assert_one_line_error(stderr):
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].strip()


def make_db(path, max_depth=None):
    with litequeue.Queue(str(path), max_depth=max_depth) as queue:
        litequeue.builtin_tasks(queue, demos=True)  # declared, as `serve` without --app does
        queue.enqueue("echo", {"seed": 1})
    return str(path)


def one_of_each_state(path):
    """A file with exactly one job in each of the six states (and a 'fail' breaker row)."""
    with litequeue.Queue(str(path)) as q:
        litequeue.builtin_tasks(q, demos=True)      # declared, as `serve` without --app does
        ids = {}
        ids["done"] = q.enqueue("echo", {"n": 1}, priority="critical")
        job = q.claim("w1")[0]
        q.complete(job.id, "w1", job.attempts, {"ok": True})
        ids["dead"] = q.enqueue("fail", priority="critical")
        job = q.claim("w1")[0]
        q.fail(job.id, "w1", job.attempts, "RuntimeError: failed on purpose")
        ids["running"] = q.enqueue("sleep", priority="critical")
        q.claim("w1")
        ids["cancelled"] = q.enqueue("echo")
        q.cancel(ids["cancelled"])
        ids["skipped"] = q.enqueue("echo", ttl=1)
        q.expire(at=litequeue.now() + 10)
        ids["queued"] = q.enqueue("echo", priority="low")
        assert {s: q.get(i).state for s, i in ids.items()} == {s: s for s in ids}
    return ids


# -- enqueue -------------------------------------------------------------------------------

def test_enqueue_prints_the_job_id(db_path):
    with litequeue.Queue(db_path) as q:
        litequeue.builtin_tasks(q, demos=True)
    result = invoke("enqueue", "echo", "--payload", '{"doc_id": 7}', "--db", db_path)
    assert result.exit_code == 0, (result.output, result.exception)
    job_id = int(result.stdout.strip())
    assert result.stderr == ""
    with litequeue.Queue(db_path) as q:
        job = q.get(job_id)
        assert (job.task, job.payload, job.state) == ("echo", {"doc_id": 7}, "queued")


def test_enqueue_options_reach_the_job(db_path):
    with frozen(T0):
        result = invoke("enqueue", "echo", "--priority", "high", "--delay", "30s", "--ttl", "1m",
                        "--max-attempts", "5", "--timeout", "10", "--memory-limit", "200M",
                        "--db", db_path)
    assert result.exit_code == 0, (result.output, result.exception)
    with litequeue.Queue(db_path) as q:
        job = q.get(int(result.stdout))
    assert job.priority == "high" and job.max_attempts == 5 and job.timeout_s == 10.0
    assert job.due_at == pytest.approx(T0 + 30) and job.expires_at == pytest.approx(T0 + 90)
    assert job.memory_limit_bytes == 200 * 2**20


def test_duplicate_unique_prints_the_same_id(db_path):
    first = invoke("enqueue", "echo", "--unique", "nightly", "--db", db_path)
    second = invoke("enqueue", "echo", "--unique", "nightly", "--payload", "[2]", "--db", db_path)
    assert first.exit_code == second.exit_code == 0
    assert first.stdout.strip() == second.stdout.strip()
    heartbeat = invoke("enqueue", "heartbeat", "--db", db_path)
    again = invoke("enqueue", "heartbeat", "--db", db_path)
    assert heartbeat.stdout == again.stdout and heartbeat.stdout.strip().isdigit()
    with litequeue.Queue(db_path) as q:
        assert q.stats()["jobs"]["queued"] == 2


def test_enqueue_of_unknown_task_warns_on_stderr(db_path):
    known = invoke("enqueue", "heartbeat", "--db", db_path)
    assert known.exit_code == 0 and known.stderr == ""
    typo = invoke("enqueue", "heartbaet", "--db", db_path)
    assert typo.exit_code == 0
    assert typo.stdout.strip().isdigit()
    assert_one_line_error(typo.stderr)
    assert "heartbaet" in typo.stderr and "warning" in typo.stderr.lower()
    with litequeue.Queue(db_path) as q:
        assert q.get(int(typo.stdout)).task == "heartbaet"


def test_enqueue_of_a_registered_task_does_not_warn(db_path):
    with litequeue.Queue(db_path) as q:
        @q.task(priority="low")
        def rotate_logs(ctx):
            return None
    result = invoke("enqueue", "rotate_logs", "--db", db_path)
    assert result.exit_code == 0 and result.stderr == ""
    with litequeue.Queue(db_path) as q:
        assert q.get(int(result.stdout)).priority == "low"     # the stored default


# -- status ---------------------------------------------------------------------------------

def test_status_json_has_the_spec_keys(db_path):
    with frozen(T0):
        one_of_each_state(db_path)
        with litequeue.Queue(db_path) as q:
            q.enqueue("heartbeat")
            job = q.claim("w1", tasks=["heartbeat"])[0]
            q.complete(job.id, "w1", job.attempts)
    with frozen(T0 + 42):
        result = invoke("status", "--json", "--db", db_path)
    assert result.exit_code == 0, (result.output, result.exception)
    status = json.loads(result.stdout)
    assert status["jobs"] == {"queued": 1, "running": 1, "done": 2, "dead": 1,
                              "cancelled": 1, "skipped": 1}
    assert status["memory"]["level"] in ("normal", "skip", "preempt", "emergency")
    assert isinstance(status["memory"]["pressure"], (int, float))
    assert 0 <= status["memory"]["pressure"] <= 100
    assert status["breakers"] == {"fail": "closed"}
    assert status["heartbeat_age"] == pytest.approx(42.0)


def test_read_only_commands_do_not_create_a_mistyped_file(tmp_path):
    typo = tmp_path / "typo.db"
    for args in (["status"], ["jobs", "list"], ["breaker", "list"], ["purge", "--older-than", "1d"]):
        result = run_cli(*args, db=typo)
        assert result.returncode == 4, (args, result.stderr)
        assert "no database" in result.stderr and result.stderr.count("\n") == 1
        assert not typo.exists()


def test_status_json_on_a_fresh_file(db_path):
    litequeue.Queue(db_path).close()
    result = invoke("status", "--json", "--db", db_path)
    assert result.exit_code == 0, (result.output, result.exception)
    status = json.loads(result.stdout)
    assert status["jobs"] == {state: 0 for state in STATES}
    assert status["heartbeat_age"] is None
    assert status["breakers"] == {}
    assert status["memory"]["level"] == "normal"          # no live supervisor


def test_status_table_is_readable(db_path):
    one_of_each_state(db_path)
    result = invoke("status", "--db", db_path)
    assert result.exit_code == 0, (result.output, result.exception)
    text = result.stdout
    for state in STATES:
        assert f"{state} 1" in text
    assert "memory" in text and "normal" in text
    assert "fail: closed" in text
    assert "heartbeat" in text and "never" in text
    assert "unserved" in text                               # queued, no live supervisor
    assert "{" not in text                                  # a table, not JSON


# -- jobs list / show / cancel / retry ---------------------------------------------------------

def test_jobs_list_filters(db_path):
    ids = one_of_each_state(db_path)
    result = invoke("jobs", "list", "--db", db_path)
    assert result.exit_code == 0, (result.output, result.exception)
    rows = result.stdout.strip().splitlines()
    assert len(rows) == 1 + 6
    listed = [int(row.split()[0]) for row in rows[1:]]
    assert listed == sorted(ids.values(), reverse=True)       # newest first

    dead = invoke("jobs", "list", "--state", "dead", "--db", db_path)
    assert [int(r.split()[0]) for r in dead.stdout.strip().splitlines()[1:]] == [ids["dead"]]
    assert "fail" in dead.stdout

    as_json = invoke("jobs", "list", "--task", "echo", "--json", "--db", db_path)
    found = json.loads(as_json.stdout)
    assert {j["id"] for j in found} == {ids["done"], ids["cancelled"], ids["skipped"],
                                        ids["queued"]}
    assert all(j["task"] == "echo" for j in found)

    bad = invoke("jobs", "list", "--state", "finished", "--db", db_path)
    assert bad.exit_code == 2


def test_jobs_show_prints_the_job_and_its_events(db_path):
    ids = one_of_each_state(db_path)
    result = invoke("jobs", "show", ids["dead"], "--db", db_path)
    assert result.exit_code == 0, (result.output, result.exception)
    shown = json.loads(result.stdout)
    assert shown["id"] == ids["dead"] and shown["state"] == "dead"
    assert shown["task"] == "fail" and "failed on purpose" in shown["error"]
    assert [(e["from_state"], e["to_state"]) for e in shown["events"]][-2:] == [
        ("queued", "running"), ("running", "dead")]


def test_jobs_cancel_and_retry(db_path):
    with litequeue.Queue(db_path) as q:
        job_id = q.enqueue("echo")
    cancelled = invoke("jobs", "cancel", job_id, "--db", db_path)
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.stdout
    with litequeue.Queue(db_path) as q:
        assert q.get(job_id).state == "cancelled"
    retried = invoke("jobs", "retry", job_id, "--db", db_path)
    assert retried.exit_code == 0 and retried.stdout.strip() == str(job_id)
    with litequeue.Queue(db_path) as q:
        assert q.get(job_id).state == "queued"


def test_jobs_cancel_running_asks_the_supervisor(db_path):
    with litequeue.Queue(db_path) as q:
        job_id = q.enqueue("echo")
        q.claim("w1")
    result = invoke("jobs", "cancel", job_id, "--db", db_path)
    assert result.exit_code == 0 and "requested" in result.stdout
    with litequeue.Queue(db_path) as q:
        job = q.get(job_id)
        assert job.state == "running" and job.cancel_requested


@pytest.mark.parametrize("args", [
    ("jobs", "show", "999"), ("jobs", "show", "abc"), ("jobs", "cancel", "999"),
    ("jobs", "retry", "1"),                 # queued: not retryable
    ("jobs", "cancel", "2"),                # done: not cancellable
], ids=["show-missing", "show-not-a-number", "cancel-missing", "retry-queued", "cancel-done"])
def test_jobs_commands_refuse_with_one_line(db_path, args):
    with litequeue.Queue(db_path) as q:
        q.enqueue("echo", priority="low")
        q.enqueue("echo", priority="critical")
        job = q.claim("w1")[0]
        q.complete(job.id, "w1", job.attempts)
    settle(db_path)
    before = file_digest(db_path)
    result = main(*args, "--db", db_path)
    assert result.exit_code == 2
    assert_one_line_error(result.stderr)
    assert file_digest(db_path) == before


# -- purge ---------------------------------------------------------------------------------------

def test_purge_older_than(db_path):
    with frozen(T0):
        with litequeue.Queue(db_path) as q:
            old = q.enqueue("echo")
            q.cancel(old)
            waiting = q.enqueue("echo")
    with frozen(T0 + 6 * 86400):
        with litequeue.Queue(db_path) as q:
            recent = q.enqueue("echo")
            q.cancel(recent)
    with frozen(T0 + 8 * 86400):
        result = invoke("purge", "--older-than", "7d", "--db", db_path)
    assert result.exit_code == 0, (result.output, result.exception)
    assert re.search(r"\b1\b", result.stdout)               # one job purged
    with litequeue.Queue(db_path) as q:
        assert {j.id for j in q.jobs(limit=None)} == {waiting, recent}
        assert q.events(job_id=old) == []


def test_purge_requires_older_than(db_path):
    make_db(db_path)
    settle(db_path)
    before = file_digest(db_path)
    result = main("purge", "--db", db_path)
    assert result.exit_code == 2
    assert_one_line_error(result.stderr)
    assert file_digest(db_path) == before


# -- events ---------------------------------------------------------------------------------------

def events_file(path):
    """A job that ran (queued -> running -> done) an hour ago, a level change with its pressure
    and a breaker transition now (T0)."""
    with frozen(T0 - 3600), litequeue.Queue(str(path)) as q:
        job_id = q.enqueue("echo")
        job = q.claim("w1")[0]
        q.complete(job.id, "w1", job.attempts, {"ok": True})
    with litequeue.Queue(str(path)) as q:
        q.record_event("level", "normal", "elevated", "pressure rose", pressure=72.5, at=T0)
        q.record_event("breaker", "closed", "open", "5 failures in 60s", task="fail", at=T0)
    return job_id


def local_iso(at):
    return datetime.datetime.fromtimestamp(at).isoformat(timespec="seconds")


def test_events_prints_one_line_per_event(db_path):
    job_id = events_file(db_path)
    with frozen(T0):
        result = invoke("events", "--db", db_path)
    assert result.exit_code == 0, (result.output, result.exception)
    lines = result.stdout.splitlines()[1:]          # under a header
    assert len(lines) == 4
    ran, done, level, breaker = (line.split() for line in lines)
    assert ran[:7] == [local_iso(T0 - 3600), str(job_id), "echo", "job", "queued", "->",
                       "running"]
    assert done[4:7] == ["running", "->", "done"]
    assert level[:7] == [local_iso(T0), "-", "-", "level", "normal", "->", "elevated"]
    assert level[-1] == "72.5%" and "pressure rose" in lines[2]
    assert breaker[1:7] == ["-", "fail", "breaker", "closed", "->", "open"]
    assert breaker[-1] == "-"


def test_events_filters_by_job_kind_and_age(db_path):
    job_id = events_file(db_path)
    with frozen(T0):
        by_job = invoke("events", "--job", job_id, "--json", "--db", db_path)
        by_kind = invoke("events", "--kind", "level", "--json", "--db", db_path)
        recent = invoke("events", "--since", "30m", "--json", "--db", db_path)
        old_too = invoke("events", "--since", "2h", "--json", "--db", db_path)
    assert [(e["job_id"], e["to_state"]) for e in json.loads(by_job.stdout)] == [
        (job_id, "running"), (job_id, "done")]
    assert [(e["kind"], e["pressure"]) for e in json.loads(by_kind.stdout)] == [("level", 72.5)]
    assert [e["kind"] for e in json.loads(recent.stdout)] == ["level", "breaker"]
    assert len(json.loads(old_too.stdout)) == 4


def test_events_since_in_the_python_api(db_path):
    events_file(db_path)
    with litequeue.Queue(db_path) as q:
        assert [e["kind"] for e in q.events(since=T0 - 1)] == ["level", "breaker"]
        assert [e["kind"] for e in q.events(since=T0 - 1, kind="breaker")] == ["breaker"]


@pytest.mark.parametrize("args, said", [
    (("--since", "soon"), "--since"),
    (("--since", "-5m"), "--since"),
    (("--job", "abc"), "job id"),
    (("--job", "0"), "no job 0"),
    (("--job", "424242"), "no job 424242"),
])
def test_events_bad_input_is_exit_2_in_one_line(db_path, args, said):
    events_file(db_path)
    result = main("events", *args, "--db", db_path)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and said in result.stderr
    assert result.stdout == ""


def test_events_from_a_real_subprocess(db_path):
    job_id = events_file(db_path)
    result = run_cli("events", "--kind", "job", "--json", db=db_path)
    assert result.returncode == 0, result.stderr
    assert [e["job_id"] for e in json.loads(result.stdout)] == [job_id, job_id]


# -- --db and $LITEQUEUE_DB -----------------------------------------------------------------------

def test_db_defaults_to_the_environment(tmp_path):
    target = str(tmp_path / "from-env.db")
    result = invoke("enqueue", "echo", env={"LITEQUEUE_DB": target})
    assert result.exit_code == 0, (result.output, result.exception)
    assert os.path.exists(target)
    assert not (tmp_path / "litequeue.db").exists()
    with litequeue.Queue(target) as q:
        assert q.get(int(result.stdout)).task == "echo"
    listed = invoke("jobs", "list", "--json", env={"LITEQUEUE_DB": target})
    assert [j["id"] for j in json.loads(listed.stdout)] == [int(result.stdout)]
    explicit = str(tmp_path / "explicit.db")                 # --db wins over the environment
    invoke("enqueue", "echo", "--db", explicit, env={"LITEQUEUE_DB": target})
    with litequeue.Queue(explicit) as q:
        assert len(q.jobs()) == 1


def test_db_defaults_to_litequeue_db_in_cwd(tmp_path):
    result = invoke("enqueue", "echo")
    assert result.exit_code == 0, (result.output, result.exception)
    with litequeue.Queue(str(tmp_path / "litequeue.db")) as q:
        assert q.get(int(result.stdout)).task == "echo"


# -- exit codes, one-line errors, nothing changed ------------------------------------------------

BAD_INPUT = [
    ("malformed-json", ["enqueue", "echo", "--payload", "{bad"]),
    ("json-nan", ["enqueue", "echo", "--payload", '{"x": NaN}']),
    ("unknown-priority", ["enqueue", "echo", "--priority", "urgent"]),
    ("negative-delay", ["enqueue", "echo", "--delay", "-5"]),
    ("nan-delay", ["enqueue", "echo", "--delay", "nan"]),
    ("bad-delay", ["enqueue", "echo", "--delay", "5x"]),
    ("payload-too-large", ["enqueue", "echo", "--payload",
                           json.dumps("x" * litequeue.MAX_PAYLOAD_BYTES)]),
    ("payload-lone-surrogate", ["enqueue", "echo", "--payload", '"\\ud800"']),
    ("bad-size", ["enqueue", "echo", "--memory-limit", "12Q"]),
    ("zero-ttl", ["enqueue", "echo", "--ttl", "0"]),
    ("zero-attempts", ["enqueue", "echo", "--max-attempts", "0"]),
    ("attempts-not-int", ["enqueue", "echo", "--max-attempts", "three"]),
    ("bad-duration", ["purge", "--older-than", "5x"]),
    ("negative-duration", ["purge", "--older-than", "-7d"]),
    ("unknown-command", ["frobnicate"]),
    ("missing-task", ["enqueue"]),
]


@pytest.mark.parametrize("args", [a for _, a in BAD_INPUT], ids=[n for n, _ in BAD_INPUT])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(db_path, args):
    make_db(db_path)
    settle(db_path)
    before = file_digest(db_path)
    result = main(*args, "--db", db_path) if args[0] != "frobnicate" else main(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert_one_line_error(result.stderr)
    assert result.stdout == ""
    assert file_digest(db_path) == before


@pytest.mark.parametrize("args", [
    ["enqueue", "echo", "--priority", "urgent"],
    ["enqueue", "echo", "--delay", "-5"],
    ["enqueue", "echo", "--memory-limit", "12Q"],
], ids=["priority", "delay", "size"])
def test_bad_input_on_a_missing_file_creates_nothing(tmp_path, args):
    path = tmp_path / "never.db"
    result = main(*args, "--db", path)
    assert result.exit_code == 2
    assert_one_line_error(result.stderr)
    assert sorted(os.listdir(tmp_path)) == []


def test_queue_full_exits_3_and_changes_nothing(db_path):
    make_db(db_path, max_depth=1)
    settle(db_path)
    before = file_digest(db_path)
    result = main("enqueue", "echo", "--db", db_path)
    assert result.exit_code == 3
    assert_one_line_error(result.stderr)
    assert "full" in result.stderr
    assert file_digest(db_path) == before


def test_duplicate_unique_on_a_full_queue_exits_0(db_path):
    with litequeue.Queue(db_path, max_depth=1) as q:
        job_id = q.enqueue("heartbeat")
    result = main("enqueue", "heartbeat", "--db", db_path)
    assert result.exit_code == 0
    assert result.stdout.strip() == str(job_id)


def _directory(tmp_path):
    path = tmp_path / "a-directory"
    path.mkdir()
    return path


def _not_sqlite(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a database\n" * 100)
    return path


def _foreign(tmp_path):
    path = tmp_path / "foreign.db"
    conn = apsw.Connection(str(path))
    conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, owner TEXT);"
                 "INSERT INTO accounts (owner) VALUES ('ada')")
    conn.close()
    return path


def _newer(tmp_path):
    path = tmp_path / "newer.db"
    make_db(path)
    conn = apsw.Connection(str(path))
    conn.execute(f"PRAGMA user_version = {litequeue.SCHEMA_VERSION + 1}")
    conn.close()
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.db"
    path.write_bytes(b"")
    return path


UNUSABLE = {"directory": _directory, "not-sqlite": _not_sqlite, "foreign-sqlite": _foreign,
            "newer-version": _newer, "zero-length": _empty}


@pytest.mark.parametrize("kind", list(UNUSABLE))
@pytest.mark.parametrize("command", [["enqueue", "echo"], ["status", "--json"],
                                     ["jobs", "list"]], ids=["enqueue", "status", "jobs-list"])
def test_unusable_database_exits_4_and_is_untouched(tmp_path, kind, command):
    path = UNUSABLE[kind](tmp_path)
    before = file_digest(path)
    result = main(*command, "--db", path)
    assert result.exit_code == 4, (result.stdout, result.stderr)
    assert_one_line_error(result.stderr)
    assert str(path) in result.stderr
    assert result.stdout == ""
    assert file_digest(path) == before


# -- real subprocesses, as cron and systemd run it ------------------------------------------------

def test_help_works_from_another_cwd(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("enqueue", "status", "jobs", "purge", "serve"):
        assert command in result.stdout
    assert result.stderr == ""
    assert os.listdir(tmp_path) == []              # --help creates no database


def test_real_enqueue_and_duplicate_unique(tmp_path):
    db = tmp_path / "cron.db"
    first = run_cli("enqueue", "heartbeat", db=db, cwd=tmp_path)
    second = run_cli("enqueue", "heartbeat", db=db, cwd=tmp_path)
    assert first.returncode == second.returncode == 0, (first.stderr, second.stderr)
    assert first.stdout.strip().isdigit() and first.stdout == second.stdout
    assert first.stderr == second.stderr == ""
    status = run_cli("status", "--json", env={"LITEQUEUE_DB": str(db)}, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["jobs"]["queued"] == 1


@pytest.mark.parametrize("case, code", [("bad-json", 2), ("queue-full", 3), ("foreign", 4)])
def test_real_exit_codes(tmp_path, case, code):
    if case == "foreign":
        db = _foreign(tmp_path)
    else:
        db = make_db(tmp_path / "q.db", max_depth=1 if case == "queue-full" else None)
    before = file_digest(db)
    args = ["enqueue", "echo"] + (["--payload", "{not json"] if case == "bad-json" else [])
    result = run_cli(*args, db=db, cwd=tmp_path)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert_one_line_error(result.stderr)
    assert file_digest(db) == before
