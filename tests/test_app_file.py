"""`serve --app` serves the file the app's Queue opens when --db and $LITEQUEUE_DB say
nothing, says so when that path is relative, and says out loud when --db names another file;
an enqueue of a task nobody declared warns from Python as the CLI does."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest

import litequeue
from conftest import ROOT, SCRIPT


def app_opening(tmp_path, *paths):
    """A task module whose Queue objects open these paths, as a user writes it."""
    queues = "\n".join(f"queue{i} = Queue({path!r})" for i, path in enumerate(paths))
    (tmp_path / "tasks.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from litequeue import Queue
    """) + queues + textwrap.dedent("""

        @queue0.task(max_attempts=1)
        def note(ctx):
            return "noted"
    """))
    return "tasks.py"


def serve(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "LITEQUEUE_DB"}
    return subprocess.run([sys.executable, SCRIPT, "serve", "--burst", "--poll", "0.05", *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=60)


def test_serve_without_db_serves_the_file_the_apps_queue_opens(tmp_path):
    app = app_opening(tmp_path, "jobs.db")             # relative, as in a web app's code
    with litequeue.Queue(tmp_path / "jobs.db") as producer:
        job_id = producer.enqueue("note")
    out = serve("--app", app, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    with litequeue.Queue(tmp_path / "jobs.db") as q:
        assert q.get(job_id).state == "done"
    assert not (tmp_path / "litequeue.db").exists()    # the old default was not used
    warning = [line for line in out.stderr.splitlines() if "litequeue: warning" in line]
    assert len(warning) == 1 and "relative path" in warning[0], out.stderr
    assert str(tmp_path / "jobs.db") in warning[0]


def test_an_absolute_path_in_the_app_is_served_without_a_word(tmp_path):
    app = app_opening(tmp_path, str(tmp_path / "jobs.db"))
    with litequeue.Queue(tmp_path / "jobs.db") as producer:
        job_id = producer.enqueue("note")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = serve("--app", str(tmp_path / app), cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stderr
    with litequeue.Queue(tmp_path / "jobs.db") as q:
        assert q.get(job_id).state == "done"


def test_db_naming_another_file_than_the_app_opens_is_said_out_loud(tmp_path):
    app = app_opening(tmp_path, str(tmp_path / "jobs.db"))
    out = serve("--app", app, "--db", str(tmp_path / "other.db"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "will not run here" in out.stderr and str(tmp_path / "jobs.db") in out.stderr


def test_an_app_opening_several_files_needs_db(tmp_path):
    app = app_opening(tmp_path, str(tmp_path / "a.db"), str(tmp_path / "b.db"))
    out = serve("--app", app, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "--db" in out.stderr, out.stderr


def test_enqueue_of_a_task_nobody_declared_warns_from_python(queue):
    @queue.task
    def declared(ctx):
        return None

    with pytest.warns(litequeue.UnknownTaskWarning, match="'declraed'"):
        queue.enqueue("declraed")
    with pytest.warns(litequeue.UnknownTaskWarning, match="'nobody'"):
        queue.enqueue_many(["declared", "nobody"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        queue.enqueue("declared")                    # known: no warning
        queue.enqueue("heartbeat")                   # built in: no warning either
