"""Every example in examples/ is run here, the way its README says to run it, so none rots."""

import filecmp
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

import litequeue
from conftest import ROOT, run_cli, wait_for

EXAMPLES = os.path.join(ROOT, "examples")


def clean_env(**extra):
    """The environment without anything that could point a subprocess at this checkout or
    at another database."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LITEQUEUE_DB", "PYTHONDONTWRITEBYTECODE")}
    env.update(extra)
    return env


def run(command, *, cwd, timeout, env=None):
    result = subprocess.run(command, cwd=cwd, env=env or clean_env(), capture_output=True,
                            text=True, timeout=timeout)
    # Shown by pytest when an assertion below fails.
    print(f"$ {shlex.join(map(str, command))}\n--- stdout\n{result.stdout}"
          f"--- stderr\n{result.stderr}")
    return result


# --------------------------------------------------------------------------------------
# quickstart.py
# --------------------------------------------------------------------------------------

def test_quickstart_shows_jobs_shedding_and_preempt_resume(tmp_path):
    # From an unrelated directory: it finds litequeue.py beside examples/ by itself.
    result = run([sys.executable, os.path.join(EXAMPLES, "quickstart.py")], cwd=tmp_path,
                 timeout=120)
    out = result.stdout
    assert result.returncode == 0
    assert "quickstart: all three happened." in out
    assert out.count("[ok]") == 3 and "FAILED" not in out
    # What the user is told they will see, as it happened:
    assert re.search(r"#\d+\s+sleep\s+normal\s+running -> done", out)
    assert re.search(r"#\d+\s+chunked\s+low\s+running -> queued\s+preempted at [\d.]+% memory "
                     r"pressure", out)
    assert re.search(r"#\d+\s+heartbeat\s+low\s+(queued -> )?skipped\s+shed under memory "
                     r"pressure", out)
    assert re.search(r"#\d+\s+chunked\s+low\s+running -> done\s+\{\"sum\": 190, \"chunks\": 20\}",
                     out)
    assert "level    -    -         skip -> preempt" in out or \
        "level    -    -         normal -> preempt" in out
    assert "emergency" not in out.split("events (")[1]      # the budget was sized right
    # The status table and the events table.
    assert re.search(r"jobs\s+queued 0\s+running 0\s+done 7\s+dead 0\s+cancelled 0\s+skipped 1",
                     out)
    assert "events (the `events` table" in out
    # It cleaned up after itself and wrote nothing where it was run.
    temp_dir = re.search(r"database (\S+)/quickstart\.db", out).group(1)
    assert not os.path.exists(temp_dir)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------
# vendored_app/
# --------------------------------------------------------------------------------------

def test_vendored_app_copies_enqueues_and_serves(tmp_path):
    app = tmp_path / "app"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run(["sh", os.path.join(EXAMPLES, "vendored_app", "setup_and_run.sh"), str(app)],
                 cwd=elsewhere, timeout=60, env=clean_env(PYTHON=sys.executable))
    assert result.returncode == 0

    # The install is two files, copied as they are; the app's files beside them.
    for name in ("litequeue.py", "schema.sql"):
        assert filecmp.cmp(app / name, os.path.join(ROOT, name), shallow=False)
    for name in ("tasks.py", "enqueue.py"):
        assert filecmp.cmp(app / name, os.path.join(EXAMPLES, "vendored_app", name),
                           shallow=False)
    # The app imported the vendored copy (sys.path[0] is the app directory), not this one.
    assert list((app / "__pycache__").glob("litequeue.*.pyc"))

    with litequeue.Queue(app / "queue.db") as queue:
        jobs = {(job.task, (job.payload or {}).get("sensor")): job
                for job in queue.jobs(limit=None)}
        assert len(jobs) == 7                      # the duplicate housekeeping made nothing
        assert {job.state for job in jobs.values()} == {"done"}
        assert jobs[("summarize", "boiler")].result == {
            "sensor": "boiler", "count": 4, "max": 35.0, "mean": 30.88}
        assert jobs[("summarize", "door")].priority == "critical"
        assert jobs[("alert", "boiler")].result == {"alerted": "boiler"}
        assert jobs[("alert", "boiler")].priority == "high"
        assert jobs[("upload_backlog", None)].result == {"sent": 10}
        assert jobs[("upload_backlog", None)].checkpoint == {"sent": 10}
        assert jobs[("housekeeping", None)].priority == "low"
        assert set(queue.catalogue()) >= {"alert", "summarize", "upload_backlog",
                                          "housekeeping", "heartbeat"}
    assert (app / "alerts.log").read_text().count('"sensor": "boiler"') == 1
    assert "housekeeping: job 6, enqueued again: job 6 (the same one)" in result.stdout
    # Served from "/", by absolute paths: nothing landed in the caller's directory.
    assert list(elsewhere.iterdir()) == []


# --------------------------------------------------------------------------------------
# chunked_task.py
# --------------------------------------------------------------------------------------

def test_chunked_task_checkpoints_stops_and_resumes(tmp_path):
    result = run([sys.executable, os.path.join(EXAMPLES, "chunked_task.py")], cwd=tmp_path,
                 timeout=90)
    out = result.stdout
    assert result.returncode == 0
    assert "SIGTERM: serve exited 0" in out
    # ctx.progress shows in `status` while they run.
    assert re.search(r"running\s+#\d+ count_primes\s+normal\s+.*progress \d+/100000", out)
    assert re.search(r"running\s+#\d+ checksum\s+low\s+.*progress \d+/20", out)
    # Stopped at a checkpoint, uncharged; then resumed from it.
    assert re.search(r"count_primes\s+queued\s+checkpoint \{'next': \d+, 'count': \d+\}\s+"
                     r"attempts 0", out)
    assert re.search(r"checksum\s+queued\s+checkpoint \{'block': \d+, 'crc': \d+\}\s+"
                     r"attempts 0", out)
    assert "'primes': 9592" in out
    assert "both resumed from their checkpoints, answers checked" in out and "FAILED" not in out
    temp_dir = re.search(r"in (\S+)/queue\.db", out).group(1)
    assert not os.path.exists(temp_dir)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------
# crontab
# --------------------------------------------------------------------------------------

def crontab_entries(path):
    """(schedule, command) of each job line, and the VAR=value lines, of a crontab."""
    entries, variables = [], {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if re.match(r"^[A-Za-z_][A-Za-z0-9_]*\s*=", line):
                name, _, value = line.partition("=")
                variables[name.strip()] = value.strip()
                continue
            fields = line.split(None, 5)
            entries.append((" ".join(fields[:5]), fields[5]))
    return entries, variables


def test_crontab_heartbeat_never_piles_up(tmp_path):
    entries, variables = crontab_entries(os.path.join(EXAMPLES, "crontab"))
    assert len(entries) == 1
    schedule, command = entries[0]
    assert schedule == "* * * * *"                     # every minute
    assert variables == {}                  # no PATH needed: the interpreter's path is whole
    state = tmp_path / "var"
    state.mkdir()
    db = state / "queue.db"

    def tick():
        # As cron runs it: /bin/sh, a bare environment, the home directory as cwd.
        result = as_cron_runs(f"{schedule} {command}", ROOT, state)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")

    def heartbeats(state=None):
        with litequeue.Queue(db) as queue:
            return queue.jobs(task="heartbeat", state=state, limit=None)

    for _ in range(5):                                  # five minutes, no supervisor
        tick()
    waiting = heartbeats()
    assert [job.state for job in waiting] == ["queued"]
    assert waiting[0].priority == "low" and waiting[0].shed

    # A supervisor runs it; the next minute's tick enqueues exactly one new one.
    served = run_cli("serve", "--burst", "--poll", "0.1", db=db)
    assert served.returncode == 0, served.stderr
    for _ in range(3):
        tick()
    assert sorted(job.state for job in heartbeats()) == ["done", "queued"]
    status = run_cli("status", "--json", db=db)
    assert status.returncode == 0
    assert json.loads(status.stdout)["heartbeat_age"] is not None


def readme_cron_line():
    """The crontab line README.md documents, as written: the one job line in the ```cron
    block of "From the command line, cron and systemd"."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("## From the command line, cron and systemd", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```cron\n(.*?)```", section, re.S)
    lines = [line for block in blocks for line in block.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) == 1, lines
    return lines[0]


def as_cron_runs(line, app_dir, state_dir):
    """The command of a crontab line with the example's paths made real: this interpreter
    for the app's venv, this checkout for /opt/app, a temporary directory for
    /var/lib/app; run by /bin/sh in cron's bare environment from the home directory."""
    fields = line.split(None, 5)
    assert " ".join(fields[:5]) == "* * * * *", line          # every minute
    command = (fields[5].replace("/opt/app/venv/bin/python", shlex.quote(sys.executable))
               .replace("/opt/app", shlex.quote(app_dir))
               .replace("/var/lib/app", shlex.quote(str(state_dir))))
    home = state_dir.parent / "home"
    home.mkdir(exist_ok=True)
    return subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", f"HOME={home}", "sh", "-c",
                           command], cwd=home, capture_output=True, text=True, timeout=60)


def test_readme_cron_line_works_as_cron_runs_it(tmp_path):
    line = readme_cron_line()
    # Nothing cron's PATH (/usr/bin:/bin) would have to find: the venv's interpreter by its
    # absolute path; the cached bytecode (-m) rather than a script compiled on every run.
    assert line.split(None, 5)[5].split()[0] != "python", line
    assert "/opt/app/venv/bin/python -m litequeue enqueue heartbeat" in line
    assert line.rstrip().endswith(">/dev/null")         # the job id is not mailed every minute
    # examples/crontab carries the same line.
    entries, _ = crontab_entries(os.path.join(EXAMPLES, "crontab"))
    assert [f"{schedule} {command}" for schedule, command in entries] == [line]

    state = tmp_path / "var"
    state.mkdir()
    for _ in range(2):
        result = as_cron_runs(line, ROOT, state)
        # Silent on success: nothing for cron to mail.
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    with litequeue.Queue(state / "queue.db") as queue:
        assert [job.state for job in queue.jobs(task="heartbeat", limit=None)] == ["queued"]


def test_readme_cron_line_speaks_on_failure(tmp_path):
    missing = tmp_path / "no-such-dir"                 # the database's directory is missing
    result = as_cron_runs(readme_cron_line(), ROOT, missing)
    assert result.returncode != 0
    assert result.stdout == ""
    assert "no-such-dir" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1          # one line in cron's mail


# --------------------------------------------------------------------------------------
# litequeue.service
# --------------------------------------------------------------------------------------

UNIT = os.path.join(EXAMPLES, "litequeue.service")


def read_unit(path):
    """{section: {key: [values]}} of a systemd unit, with backslash continuations joined."""
    sections, section = {}, None
    with open(path) as f:
        text = re.sub(r"\\\n", " ", f.read())
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return sections


def timespan_s(text):
    """Seconds of a systemd time span: 30, 30s, 1min 30s, 500ms."""
    units = {"": 1, "s": 1, "sec": 1, "ms": 0.001, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    assert parts, text
    return sum(float(n) * units[u] for n, u in parts)


def exec_start_options(argv):
    """{--flag: value or True} of the serve command line in ExecStart."""
    assert argv[1].endswith("litequeue.py") and argv[2] == "serve", argv
    options, rest = {}, argv[3:]
    while rest:
        flag = rest.pop(0)
        assert flag.startswith("--"), flag
        name, has_value, value = flag.partition("=")
        if has_value:
            options[name] = value
        elif rest and not rest[0].startswith("--"):
            options[name] = rest.pop(0)
        else:
            options[name] = True
    return options


def test_systemd_unit_flags_exist_and_stop_timeout_covers_grace(tmp_path):
    unit = read_unit(UNIT)
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"][0])
    options = exec_start_options(argv)
    help_text = run_cli("serve", "--help").stdout
    for flag in options:                        # every flag used is one serve accepts
        assert re.search(rf"(^|\s){re.escape(flag)}(\s|$)", help_text, re.M), flag
    for needed in ("--app", "--db", "--memory-budget", "--grace"):
        assert needed in options

    grace_s = litequeue.parse_duration(options["--grace"])
    assert timespan_s(service["TimeoutStopSec"][0]) > grace_s
    budget = litequeue.parse_size(options["--memory-budget"])
    memory_max = litequeue.parse_size(service["MemoryMax"][0])
    assert budget < memory_max <= 1.5 * budget              # a bit above the budget
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["KillMode"] == ["mixed"]                 # SIGTERM to the supervisor only
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    # The database's directory is the one systemd makes and leaves writable.
    db_dir = os.path.dirname(options["--db"])
    assert db_dir == "/var/lib/" + service["StateDirectory"][0]
    assert service["WorkingDirectory"] == [db_dir]
    assert "ReadWritePaths" not in service                  # StateDirectory= covers it
    assert f"LITEQUEUE_DB={options['--db']}" in service["Environment"]
    assert "ProcSubset" not in service       # the governor reads /proc/pressure/memory
    # A memory cgroup per job (serve's --isolation auto): the unit's subtree is delegated
    # to the supervisor, and /sys/fs/cgroup is not made read-only under it.
    assert service["Delegate"] == ["yes"]
    assert service["ProtectControlGroups"] in (["no"], ["private"])
    assert service["MemoryAccounting"] == ["yes"]
    assert "--isolation" not in options or options["--isolation"] in ("auto", "cgroup")


def test_systemd_unit_is_watched_and_never_gives_up():
    unit = read_unit(UNIT)
    service = unit["Service"]
    # The supervisor says when it is ready and feeds the watchdog (tests/test_systemd.py).
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    watchdog_s = timespan_s(service["WatchdogSec"][0])
    assert litequeue.WATCHDOG_EVERY_S <= watchdog_s / 2
    assert service["SyslogIdentifier"] == ["litequeue"]
    # An unattended device: restart whatever the exit, for ever, but not after bad input.
    assert service["Restart"] == ["always"]
    assert timespan_s(service["RestartSec"][0]) >= 1
    assert unit["Unit"]["StartLimitIntervalSec"] == ["0"]
    assert service["RestartPreventExitStatus"] == ["2"]


def systemd_unit_here(tmp_path):
    """The unit with its interpreter pointed at this one: `verify` checks that ExecStart's
    binary exists."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    copy = tmp_path / "litequeue.service"
    with open(UNIT) as f:
        copy.write_text(f.read().replace("/opt/app/venv/bin/python", sys.executable))
    return copy


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    copy = systemd_unit_here(tmp_path)
    verify = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                            text=True, timeout=60)
    own = [line for line in verify.stderr.splitlines() if "litequeue.service" in line]
    assert verify.returncode == 0 and own == [], verify.stderr


def test_systemd_analyze_security_exposure_below_4(tmp_path):
    copy = systemd_unit_here(tmp_path)
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(copy)],
                              capture_output=True, text=True, timeout=60)
    print(security.stdout, security.stderr)
    if "--offline" in security.stderr and security.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline: {security.stderr.strip()}")
    last = security.stdout.strip().splitlines()[-1]
    # "→ Overall exposure level for litequeue.service: 1.0 OK 🙂"
    score = float(re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", last).group(1))
    assert score < 4.0, last


def test_systemd_exec_start_serves_and_stops_cleanly_on_sigterm(tmp_path):
    """Run the unit's ExecStart as systemd would (its Environment, WorkingDirectory, the
    vendored layout under /opt/app, Type=notify's socket and WatchdogSec) and stop it as
    KillMode=mixed does: SIGTERM to the main process only. It must say READY=1, feed the
    watchdog, say STOPPING=1 and exit 0 well within TimeoutStopSec, the running job requeued
    at its checkpoint and not charged."""
    import socket
    import tempfile

    import psutil
    from test_systemd import read_until
    service = read_unit(UNIT)["Service"]
    opt, var = tmp_path / "opt" / "app", tmp_path / "var" / "lib" / "app"
    opt.mkdir(parents=True)
    var.mkdir(parents=True)
    for source in (os.path.join(ROOT, "litequeue.py"), os.path.join(ROOT, "schema.sql"),
                   os.path.join(EXAMPLES, "vendored_app", "tasks.py")):
        shutil.copy(source, opt)

    def here(text):
        return (text.replace("/opt/app/venv/bin/python", sys.executable)
                .replace("/opt/app", str(opt)).replace("/var/lib/app", str(var)))

    argv = [here(arg) for arg in shlex.split(service["ExecStart"][0])]
    env = clean_env(**dict(here(item).split("=", 1) for item in service["Environment"]))
    # What systemd gives a Type=notify service with WatchdogSec=.
    notify_dir = tempfile.mkdtemp(prefix="lq-unit-")          # a socket path is short
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(os.path.join(notify_dir, "notify"))
    env.update(NOTIFY_SOCKET=os.path.join(notify_dir, "notify"),
               WATCHDOG_USEC=str(int(timespan_s(service["WatchdogSec"][0]) * 1e6)))
    db = exec_start_options(argv)["--db"]
    serve = subprocess.Popen(argv, cwd=here(service["WorkingDirectory"][0]), env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert read_until(notify, "READY=1", timeout=60) == ["READY=1"]
        assert read_until(notify, "WATCHDOG=1") == ["WATCHDOG=1"]
        with litequeue.Queue(db) as queue:
            job_id = queue.enqueue("upload_backlog", {"batches": 1000, "batch_s": 0.02})
            wait_for(lambda: (queue.get(job_id).checkpoint or {}).get("sent", 0) >= 3)
            children = psutil.Process(serve.pid).children(recursive=True)
            assert children
            serve.send_signal(signal.SIGTERM)
            assert set(read_until(notify, "STOPPING=1")) <= {"WATCHDOG=1", "STOPPING=1"}
            code = serve.wait(timeout=timespan_s(service["TimeoutStopSec"][0]))
            job = queue.get(job_id)
    finally:
        if serve.poll() is None:
            serve.kill()
        _, stderr = serve.communicate(timeout=30)
        notify.close()
        shutil.rmtree(notify_dir)
    assert code == 0, stderr
    assert (job.state, job.attempts, job.error) == ("queued", 0, None), stderr
    assert job.checkpoint["sent"] >= 3
    assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE
                   for child in children)


# --------------------------------------------------------------------------------------
# agent_run.py
# --------------------------------------------------------------------------------------

def test_agent_run_streams_its_transcript_is_preempted_and_resumes(tmp_path):
    result = run([sys.executable, os.path.join(EXAMPLES, "agent_run.py")], cwd=tmp_path,
                 timeout=180)
    out = result.stdout
    assert result.returncode == 0, result.stderr
    # Followed live through `jobs output --follow`: the transcript lines as they came, with
    # a marker line per attempt, the last one saying it resumed after the preemption.
    followed = [line[6:] for line in out.splitlines() if line.startswith("    | ")]
    steps = [line for line in followed if line.startswith("step ")]
    assert [int(line.split()[1].split("/")[0]) for line in steps] == list(range(1, 17))
    markers = [line for line in followed if line.startswith(litequeue.OUTPUT_MARKER)]
    assert len(markers) >= 3 and "resumed after preemption" in markers[-1]
    assert all("attempt 1/3" in marker for marker in markers)     # never charged
    assert "ok  resumed where it stopped" in out and "NOT" not in out
    assert list(tmp_path.iterdir()) == []                            # cleaned up after itself
