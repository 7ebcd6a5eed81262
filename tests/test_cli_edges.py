"""The command line tried as a new user would (issue 12): --db wherever it is typed, sizes
that name their flag, Ctrl-C, --app "", the catalogue of a new file, expired jobs in status,
help texts. The click runner for most cases, real `python litequeue.py` where it matters."""

import datetime
import json
import os
import signal
import subprocess
import sys
import time

import apsw
import pytest
from click.testing import CliRunner
from freezegun import freeze_time

import litequeue
from conftest import SCRIPT, file_digest, run_cli, wait_for, write_app


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("LITEQUEUE_DB", raising=False)
    monkeypatch.chdir(tmp_path)


def invoke(*args, env=None):
    return CliRunner().invoke(litequeue._build_cli(), [str(a) for a in args], env=env)


def main(*args):
    """litequeue.main() with its exit code and stderr."""
    runner = CliRunner()
    with runner.isolation() as (out, err, _):
        code = litequeue.main([str(a) for a in args])
        sys.stdout.flush()
        sys.stderr.flush()
        return code, out.getvalue().decode(), err.getvalue().decode()


def job_count(path):
    with litequeue.Queue(str(path), create=False) as q:
        return len(q.jobs(limit=None))


# -- 1. --db before the command, before a subcommand, after it ---------------------------------

@pytest.mark.parametrize("where", ["before", "between", "after"])
def test_db_is_taken_wherever_it_is_typed(tmp_path, where):
    target = str(tmp_path / "x.db")
    assert invoke("--db", target, "enqueue", "echo").exit_code == 0
    assert job_count(target) == 1 and not os.path.exists(tmp_path / "litequeue.db")
    commands = {"before": ["--db", target, "jobs", "list", "--json"],
                "between": ["jobs", "--db", target, "list", "--json"],
                "after": ["jobs", "list", "--json", "--db", target]}
    result = invoke(*commands[where])
    assert result.exit_code == 0, (result.output, result.exception)
    assert len(json.loads(result.stdout)) == 1
    status = invoke(*{"before": ["--db", target, "status", "--json"],
                      "between": ["--db", target, "status", "--json"],
                      "after": ["status", "--json", "--db", target]}[where])
    assert json.loads(status.stdout)["jobs"]["queued"] == 1
    assert not os.path.exists(tmp_path / "litequeue.db")


def test_group_db_wins_over_the_environment_and_the_nearest_wins(tmp_path):
    env_db, group_db, own_db = (str(tmp_path / n) for n in ("env.db", "group.db", "own.db"))
    assert invoke("--db", group_db, "enqueue", "echo", env={"LITEQUEUE_DB": env_db}).exit_code == 0
    assert invoke("--db", group_db, "enqueue", "echo", "--db", own_db).exit_code == 0
    assert invoke("breaker", "--db", group_db, "list").exit_code == 0
    assert job_count(group_db) == 1 and job_count(own_db) == 1
    assert not os.path.exists(env_db)


def test_db_before_the_command_in_a_real_subprocess(tmp_path):
    target = str(tmp_path / "x.db")
    assert run_cli("--db", target, "enqueue", "echo").returncode == 0
    result = run_cli("jobs", "--db", target, "list", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == 1
    status = run_cli("--db", target, "status", "--json")
    assert json.loads(status.stdout)["jobs"]["queued"] == 1


def test_serve_with_a_group_db_serves_it_not_the_apps_file(tmp_path):
    app = write_app(tmp_path, """
        @queue.task
        def hello(ctx):
            return "hi"
    """)
    target = str(tmp_path / "x.db")
    with litequeue.Queue(target) as q:
        job_id = q.enqueue("hello")
    result = run_cli("--db", target, "serve", "--burst", "--app", app)
    assert result.returncode == 0, result.stderr
    with litequeue.Queue(target) as q:
        assert q.get(job_id).state == "done"


# -- 2. sizes: under 1 MiB or not whole bytes is bad input, named by its flag ----------------

@pytest.mark.parametrize("args, flag, said", [
    (["enqueue", "echo", "--memory-limit", "400"], "--memory-limit", "400M"),
    (["enqueue", "echo", "--memory-limit", "0.5"], "--memory-limit", "whole number of bytes"),
    (["enqueue", "echo", "--memory-limit", "0.1M"], "--memory-limit", "whole number of bytes"),
    (["enqueue", "echo", "--memory-limit", "12Q"], "--memory-limit", "400M"),
    (["enqueue", "echo", "--delay", "soon"], "--delay", "30s"),
    (["serve", "--burst", "--memory-limit", "400"], "--memory-limit", "400M"),
    (["serve", "--burst", "--memory-budget", "512k"], "--memory-budget", "under 1 MiB"),
    (["serve", "--burst", "--output-limit", "0.5"], "--output-limit", "whole number of bytes"),
])
def test_bad_sizes_are_bad_input_naming_the_flag(tmp_path, args, flag, said):
    code, out, err = main(*args, "--db", tmp_path / "q.db")
    assert code == litequeue.EXIT_BAD_INPUT, (out, err)
    assert err.startswith(f"litequeue: error: {flag}") and said in err, err
    assert len(err.strip().splitlines()) == 1
    assert "memory_limit" not in err and not os.path.exists(tmp_path / "q.db")


def test_the_python_api_keeps_its_parameter_names(queue):
    with pytest.raises(litequeue.BadInput, match=r"^memory_limit: 400 .*400M"):
        queue.enqueue("echo", memory_limit=400)
    with pytest.raises(litequeue.BadInput, match=r"^memory_limit: '0.5' .*whole"):
        queue.enqueue("echo", memory_limit="0.5")
    with pytest.raises(litequeue.BadInput, match=r"^memory_limit: 4096 .*under 1 MiB"):
        @queue.task(memory_limit=4096)
        def tiny(ctx):
            return None
    assert "tiny" not in queue.catalogue()
    assert litequeue.parse_memory_size("1M") == 1 << 20
    assert litequeue.parse_size("0.5K") == 512


def test_a_real_enqueue_of_a_bare_number_suggests_megabytes(tmp_path):
    result = run_cli("enqueue", "echo", "--memory-limit", "400", db=tmp_path / "q.db")
    assert result.returncode == 2
    assert result.stderr == ("litequeue: error: --memory-limit: '400' is 400 bytes, "
                             "under 1 MiB; did you mean 400M?\n")


# -- 3. Ctrl-C: at once, while the file is locked and while --app imports --------------------

def interrupt(process, ready, timeout=5.0):
    """SIGINT the process once ready() holds; its exit code, and how long it took after."""
    wait_for(ready)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=timeout)
    return code, time.monotonic() - sent


def start(*args, **kwargs):
    return subprocess.Popen([sys.executable, SCRIPT, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_ctrl_c_of_enqueue_waiting_on_a_locked_file_exits_130_at_once(tmp_path):
    db = str(tmp_path / "q.db")
    litequeue.Queue(db).close()
    holder = apsw.Connection(db)
    holder.execute("BEGIN IMMEDIATE")
    try:
        process = start("enqueue", "echo", "--db", db)
        # By 1.5 s it is waiting on the lock (well inside the 10 s busy timeout).
        started = time.monotonic()
        code, took = interrupt(process, lambda: time.monotonic() - started > 1.5)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    stderr = process.stderr.read()
    assert code == 130, stderr
    assert took < 2.0, took
    assert "Traceback" not in stderr
    assert job_count(db) == 0


def test_ctrl_c_while_the_app_imports_exits_130_not_bad_input(tmp_path):
    marker = tmp_path / "importing"
    app = write_app(tmp_path, f"""
        open({str(marker)!r}, "w").close()
        time.sleep(30)
    """)
    process = start("serve", "--burst", "--app", app, "--db", tmp_path / "q.db")
    code, took = interrupt(process, marker.exists)
    stderr = process.stderr.read()
    assert code == 130, stderr
    assert "bad input" not in stderr and "cannot import" not in stderr
    assert "Traceback" not in stderr


# -- 4. --app "" and what a new file's catalogue lists ------------------------------------------

@pytest.mark.parametrize("app", ["", "  "])
def test_an_empty_app_is_bad_input_not_the_demo_tasks(tmp_path, app):
    code, out, err = main("serve", "--burst", "--app", app, "--db", tmp_path / "q.db")
    assert code == litequeue.EXIT_BAD_INPUT
    assert err.startswith("litequeue: error: --app") and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "q.db")


def test_a_new_file_lists_only_heartbeat_so_a_demo_name_on_an_apps_file_warns(tmp_path):
    db = str(tmp_path / "app.db")
    with litequeue.Queue(db) as q:
        assert set(q.catalogue()) == {"heartbeat"}

        @q.task
        def resize(ctx):
            return None
    result = invoke("enqueue", "echo", "--db", db)
    assert result.exit_code == 0
    assert "'echo' is not in this file's catalogue" in result.stderr


def test_serving_the_demo_tasks_stores_them_in_the_catalogue(tmp_path):
    db = str(tmp_path / "demo.db")
    result = run_cli("serve", "--burst", db=db)
    assert result.returncode == 0, result.stderr
    with litequeue.Queue(db) as q:
        assert {"heartbeat", "echo", "sleep"} <= set(q.catalogue())
    enqueued = invoke("enqueue", "echo", "--db", db)
    assert enqueued.exit_code == 0 and enqueued.stderr == ""


# -- 5. status counts a job whose TTL ran out as skipped, without writing --------------------

def test_status_counts_expired_jobs_as_skipped_and_writes_nothing(tmp_path):
    db = str(tmp_path / "q.db")
    with litequeue.Queue(db) as q:
        expired = q.enqueue("heartbeat", ttl="1s", priority="high")
        q.enqueue("heartbeat", ttl="1h", unique="other")
    before = file_digest(db)
    later = {"LITEQUEUE_DB": db}
    with freeze_time(datetime.datetime.fromtimestamp(time.time() + 60, datetime.timezone.utc)):
        result = invoke("status", "--json", env=later)
    assert result.exit_code == 0, (result.output, result.exception)
    status = json.loads(result.stdout)
    assert (status["jobs"]["queued"], status["jobs"]["skipped"]) == (1, 1)
    assert status["priorities"]["high"] == {"skipped": 1}
    assert status["unserved"] == ["heartbeat"]
    assert file_digest(db) == before                     # read-only: nothing swept
    with litequeue.Queue(db) as q:
        assert q.get(expired).state == "queued"          # until a supervisor sweeps it
        q.expire(at=time.time() + 60)
        assert q.stats()["jobs"]["skipped"] == 1 and q.get(expired).state == "skipped"


# -- 6. help texts -------------------------------------------------------------------------------

def all_commands(group, path=()):
    import click
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from all_commands(command, path + (name,))
        else:
            yield path + (name,), command


def test_every_option_says_what_it_is():
    cli = litequeue._build_cli()
    missing = [f"{' '.join(path)} {param.opts[0]}"
               for path, command in all_commands(cli) for param in command.params
               if param.param_type_name == "option" and not param.help]
    assert missing == []


@pytest.mark.parametrize("command, option", [
    ("serve", "--memory-limit"), ("serve", "--memory-budget"), ("serve", "--output-limit"),
    ("enqueue", "--memory-limit"),
])
def test_size_options_say_which_formats_they_take(command, option):
    (param,) = [p for p in litequeue._build_cli().commands[command].params if option in p.opts]
    assert all(form in param.help for form in ("400M", "1G", "512MiB")), param.help


def test_serve_help_says_what_runs_without_app():
    result = invoke("serve", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "without it, serve runs the built-in heartbeat and the demo tasks" in text
    for name in ("--breaker-failures", "--breaker-window", "--breaker-cooldown"):
        assert name in text
