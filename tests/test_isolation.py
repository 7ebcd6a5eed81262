"""Memory isolation: a cgroup per job.

The decisions are tested alone (choose_isolation, finding one's own group). The v2 layout is
tested against files laid out like one (this machine has no v2 memory controller). The rest
is real: supervisors run as `python litequeue.py serve` inside a v1 memory cgroup made for
each test below the test's own, their jobs in groups of their own, the kernel enforcing the
limits."""

import os
import random
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

import litequeue
from conftest import SCRIPT, status_json, wait_for, write_app

MiB = 1 << 20
FAST = ("--poll", "0.05", "--grace", "2", "--hold", "1")


def own_v1_memory_dir():
    """This process's group in the v1 memory hierarchy, if it may make groups below it."""
    found = litequeue._own_cgroups("/proc/self/cgroup", "/proc/self/mountinfo")
    path = found.get(1)
    return path if path and os.access(path, os.W_OK) else None


V1 = own_v1_memory_dir()
needs_v1 = pytest.mark.skipif(V1 is None, reason="needs a writable v1 memory cgroup (root)")


# -- decisions -------------------------------------------------------------------------

@pytest.mark.parametrize("requested, problem, expected", [
    ("auto", None, ("cgroup", None)),
    ("cgroup", None, ("cgroup", None)),
    ("auto", "no cgroup memory controller is mounted here",
     ("rlimit", "no cgroup memory controller is mounted here")),
    ("rlimit", None, ("rlimit", "--isolation rlimit")),
    ("rlimit", "anything", ("rlimit", "--isolation rlimit")),
])
def test_choose_isolation(requested, problem, expected):
    assert litequeue.choose_isolation(requested, problem) == expected


def test_isolation_cgroup_that_cannot_be_had_is_bad_input():
    with pytest.raises(litequeue.BadInput, match=r"^--isolation cgroup: no cgroup memory"):
        litequeue.choose_isolation("cgroup", "no cgroup memory controller is mounted here")


MOUNTINFO = """\
25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
33 25 0:28 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
40 25 0:35 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
41 25 0:36 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
"""


@pytest.mark.parametrize("membership, mountinfo, expected", [
    # hybrid (as here): a v1 memory hierarchy and a v2 one
    ("4:memory:/a/b\n1:cpu,cpuacct:/\n0::/user.slice\n", MOUNTINFO,
     {1: "/sys/fs/cgroup/memory/a/b", 2: "/sys/fs/cgroup/unified/user.slice"}),
    # pure v2
    ("0::/system.slice/app.service\n",
     "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
     {2: "/sys/fs/cgroup/system.slice/app.service"}),
    # a container: its group is bind-mounted as the root of the hierarchy
    ("0::/docker/abc\n",
     "30 1 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
     {2: "/sys/fs/cgroup"}),
    # no cgroup mounted at all
    ("0::/\n", "22 1 0:5 / /proc rw - proc proc rw\n", {}),
])
def test_own_cgroups_are_found_from_membership_and_mounts(tmp_path, membership, mountinfo,
                                                         expected):
    (tmp_path / "cgroup").write_text(membership)
    (tmp_path / "mountinfo").write_text(mountinfo)
    assert litequeue._own_cgroups(str(tmp_path / "cgroup"),
                                  str(tmp_path / "mountinfo")) == expected


# -- v2, against files laid out like a delegated v2 group ---------------------------------

def fake_v2(tmp_path, controllers="cpu memory pids"):
    own = tmp_path / "sys" / "app.service"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text(controllers + "\n")
    (own / "cgroup.subtree_control").write_text("\n")
    (own / "cgroup.procs").write_text(f"{os.getpid()}\n")
    (tmp_path / "cgroup").write_text("0::/app.service\n")
    (tmp_path / "mountinfo").write_text(
        f"30 1 0:26 / {tmp_path / 'sys'} rw - cgroup2 cgroup2 rw\n")
    return own


def test_v2_prepare_moves_the_supervisor_to_a_leaf_and_delegates_memory(tmp_path, monkeypatch):
    own = fake_v2(tmp_path)
    removed = []
    # Plain directories keep their files, where a cgroup's rmdir takes them with it.
    monkeypatch.setattr(litequeue.os, "rmdir", lambda path: removed.append(path))
    groups = litequeue.JobCgroups.detect(str(tmp_path / "cgroup"), str(tmp_path / "mountinfo"))
    assert groups.version == 2 and groups.own_dir == str(own)
    leaf = own / "litequeue-supervisor"
    assert (leaf / "cgroup.procs").read_text() == str(os.getpid())
    assert (own / "cgroup.subtree_control").read_text() == "+memory"
    root = own / os.path.basename(groups.root)
    assert (root / "cgroup.subtree_control").read_text() == "+memory"
    assert removed == [str(root / "child-1")]                # a group was made and tried

    job = groups.create(200 * MiB)
    assert job == str(root / "child-2")
    assert (root / "child-2" / "memory.max").read_text() == str(200 * MiB)
    assert (root / "child-2" / "memory.swap.max").read_text() == "0"
    assert (root / "child-2" / "memory.oom.group").read_text() == "1"
    litequeue.set_group_limit(2, job, 300 * MiB)
    assert (root / "child-2" / "memory.max").read_text() == str(300 * MiB)
    groups.release(job)
    assert removed[-1] == job                                 # removed with its child


def test_v2_a_supervisor_already_in_its_leaf_uses_the_group_above(tmp_path):
    own = fake_v2(tmp_path)
    (own / "litequeue-supervisor").mkdir()
    (tmp_path / "cgroup").write_text("0::/app.service/litequeue-supervisor\n")
    (own / "cgroup.subtree_control").write_text("memory\n")
    groups = litequeue.JobCgroups.detect(str(tmp_path / "cgroup"), str(tmp_path / "mountinfo"))
    assert groups.own_dir == str(own)                          # not one level deeper
    assert not (own / "litequeue-supervisor" / "litequeue-supervisor").exists()


def test_v2_a_group_shared_with_other_processes_is_left_as_it_is(tmp_path):
    own = fake_v2(tmp_path)
    (own / "cgroup.procs").write_text(f"{os.getpid()}\n1\n")
    with pytest.raises(litequeue.CgroupUnusable, match="holds other processes too"):
        litequeue.JobCgroups.detect(str(tmp_path / "cgroup"), str(tmp_path / "mountinfo"))
    assert not (own / "litequeue-supervisor").exists()          # nothing moved
    assert (own / "cgroup.subtree_control").read_text() == "\n"


def test_v2_reads_oom_kills_from_memory_events_and_kills_through_cgroup_kill(tmp_path):
    own = fake_v2(tmp_path)
    groups = litequeue.JobCgroups(2, str(own))
    group = own / "job-1"
    group.mkdir()
    assert groups.oom_counts(str(group)) == (0, 0)             # no events file: none
    (group / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n"
                                         "oom_group_kill 1\n")
    assert groups.oom_counts(str(group)) == (1, 1)
    (group / "cgroup.kill").write_text("")
    groups.kill_all(str(group))
    assert (group / "cgroup.kill").read_text() == "1"


def test_v2_without_cgroup_kill_kills_every_process_listed(tmp_path):
    own = fake_v2(tmp_path)
    groups = litequeue.JobCgroups(2, str(own))
    group = own / "job-1"
    group.mkdir()
    sleepers = [subprocess.Popen(["sleep", "30"], start_new_session=True) for _ in range(2)]
    (group / "cgroup.procs").write_text("".join(f"{p.pid}\n" for p in sleepers))
    groups.kill_all(str(group))
    assert [p.wait(timeout=5) for p in sleepers] == [-signal.SIGKILL] * 2


def test_v2_without_the_memory_controller_delegated_says_how_to_get_it(tmp_path):
    fake_v2(tmp_path, controllers="cpu pids")
    with pytest.raises(litequeue.CgroupUnusable, match="Delegate=yes"):
        litequeue.JobCgroups.detect(str(tmp_path / "cgroup"), str(tmp_path / "mountinfo"))


# -- real v1 groups ------------------------------------------------------------------------

class Group:
    """A v1 memory cgroup made for one test below the test's own, removed after it."""

    def __init__(self):
        self.path = os.path.join(V1, f"test-{os.getpid()}-{random.randrange(1 << 32):08x}")
        os.mkdir(self.path)

    def read(self, name):
        with open(os.path.join(self.path, name)) as f:
            return f.read()

    def peak_bytes(self):
        return int(self.read("memory.max_usage_in_bytes"))

    def usage_bytes(self):
        return int(self.read("memory.usage_in_bytes"))

    def subgroups(self):
        """Every group below this one, however deep."""
        return [os.path.join(d, name) for d, names, _ in os.walk(self.path) for name in names]

    def join(self):
        """For preexec_fn: the process being started joins the group before it execs."""
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def remove(self):
        for sub in sorted(self.subgroups(), key=len, reverse=True):
            for pid in open(os.path.join(sub, "cgroup.procs")).read().split():
                os.kill(int(pid), signal.SIGKILL)
            wait_for(lambda: _rmdir(sub), timeout=5)
        for pid in self.read("cgroup.procs").split():
            os.kill(int(pid), signal.SIGKILL)
        wait_for(lambda: _rmdir(self.path), timeout=5)


def _rmdir(path):
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


@pytest.fixture
def group():
    made = Group()
    yield made
    made.remove()


class GroupServe:
    """`python litequeue.py serve` started inside a group, its log kept."""

    def __init__(self, group, db, *args, wrap=()):
        self.db = db
        self.log_path = os.path.join(os.path.dirname(db), f"serve-{random.randrange(1 << 30)}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [*wrap, sys.executable, SCRIPT, "serve", "--db", db, *args],
            stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=group.join)
        self.pid = self.proc.pid

    def text(self):
        with open(self.log_path) as f:
            return f.read()

    def registered(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.text()}")
        with litequeue.Queue(self.db) as q:
            return any(s["pid"] == self.pid for s in q.live_supervisors())

    def terminate(self):
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self.log.close()
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def group_serve(db_path, group):
    started = []

    def start(*args, wrap=()):
        server = GroupServe(group, db_path, *args, wrap=wrap)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


APP = """
    import mmap

    @queue.task
    def ok(ctx, n=0):
        return {"n": n, "pid": os.getpid()}

    @queue.task(max_attempts=1)
    def shm_hog(ctx, mb=600):
        # Shared memory: no rlimit counts it. As fast as it can: the poll never sees it.
        area = mmap.mmap(-1, mb << 20, flags=mmap.MAP_SHARED)
        for offset in range(0, mb << 20, mmap.PAGESIZE):
            area[offset] = 1
        time.sleep(30)
        return "survived"

    @queue.task(max_attempts=1)
    def spawns_hogs(ctx, mb=150, programs=3):
        # Three programs, each under the rlimit it inherits, together far over the limit.
        import subprocess, sys
        program = f"b = bytearray(b'x') * ({mb} << 20); import time; time.sleep(30)"
        started = [subprocess.Popen([sys.executable, "-c", program]) for _ in range(programs)]
        with open(os.path.join(os.path.dirname(queue.path), "hog.pids"), "w") as f:
            f.write(" ".join(str(p.pid) for p in started))
        for p in started:
            p.wait()
        return "survived"

    @queue.task
    def steady(ctx, seconds=1.5):
        time.sleep(seconds)               # runs beside the hog, in a group of its own
        return {"pid": os.getpid()}

    @queue.task
    def where(ctx):
        with open("/proc/self/cgroup") as f:
            return {"cgroup": [l for l in f.read().splitlines() if ":memory:" in l][0]}
"""


def job(db, job_id):
    with litequeue.Queue(db) as q:
        return q.get(job_id)


def settle(db, job_id, timeout=30):
    return wait_for(lambda: job(db, job_id).state in litequeue.FINAL_STATES and job(db, job_id),
                    timeout=timeout)


@needs_v1
def test_the_kernel_caps_a_shared_memory_hog_at_its_limit(tmp_path, db_path, group, group_serve):
    app = write_app(tmp_path, APP)
    server = group_serve("--app", app, "--memory-limit", "200M", "--isolation", "cgroup", *FAST)
    wait_for(server.registered)
    assert "memory isolation: cgroup (cgroup v1, a group per job below " + group.path \
        in server.text()
    assert status_json(db_path)["isolation"] == "cgroup"
    with litequeue.Queue(db_path) as q:
        beside = q.enqueue("steady")
        wait_for(lambda: q.get(beside).state == "running")
        time.sleep(0.2)                            # its spare successor forked too
        baseline = group.usage_bytes()             # the supervisor's, the job beside, a spare
        hog = q.enqueue("shm_hog", {"mb": 600})
        where = q.enqueue("where")
        good = [q.enqueue("ok", {"n": i}) for i in range(3)]
    ended = settle(db_path, hog)
    lived = settle(db_path, beside)                      # the job beside it lives on
    assert (lived.state, lived.attempts) == ("done", 1), lived.error
    assert ended.state == "dead"
    assert ended.error.startswith(
        "memory limit exceeded (kernel): its cgroup reached the 200 MiB limit"), ended.error
    # The whole tree never held more than the job's limit above what the supervisor had.
    assert group.peak_bytes() < baseline + 200 * MiB + 8 * MiB, (
        group.peak_bytes() / MiB, baseline / MiB)
    assert all(settle(db_path, j).state == "done" for j in good)
    line = settle(db_path, where).result["cgroup"]
    assert re.search(r"/litequeue-\d+-\d+-[0-9a-f]{8}/child-\d+$", line), line
    with litequeue.Queue(db_path) as q:
        assert any(e["to_state"] == "running" for e in q.events(job_id=hog))
    assert server.proc.poll() is None                  # the supervisor lives on
    assert server.terminate() == 0
    assert group.subgroups() == []                     # every job's group is gone


@needs_v1
def test_the_kernel_caps_three_programs_a_job_starts_together(tmp_path, db_path, group,
                                                              group_serve):
    app = write_app(tmp_path, APP)
    server = group_serve("--app", app, "--memory-limit", "200M", *FAST)   # auto
    wait_for(server.registered)
    assert "memory isolation: cgroup" in server.text()
    baseline = group.usage_bytes()
    with litequeue.Queue(db_path) as q:
        hog = q.enqueue("spawns_hogs", {"mb": 150, "programs": 3})
        good = q.enqueue("ok")
    ended = settle(db_path, hog)
    assert ended.state == "dead"
    assert ended.error.startswith("memory limit exceeded (kernel)"), ended.error
    assert group.peak_bytes() < baseline + 200 * MiB + 8 * MiB
    pids = [int(p) for p in (tmp_path / "hog.pids").read_text().split()]
    assert len(pids) == 3
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() !=
                             psutil.STATUS_ZOMBIE for p in pids), timeout=5)
    assert settle(db_path, good).state == "done"
    assert server.proc.poll() is None
    assert server.terminate() == 0
    assert group.subgroups() == []


@needs_v1
def test_a_killed_supervisors_groups_are_removed_by_the_next_one(tmp_path, db_path, group,
                                                                 group_serve):
    app = write_app(tmp_path, """
        @queue.task
        def lingers(ctx):
            import subprocess
            # A program that leaves the job's process group: only its cgroup still holds it.
            p = subprocess.Popen(["sleep", "300"], start_new_session=True)
            with open(os.path.join(os.path.dirname(queue.path), "lingers.pid"), "w") as f:
                f.write(str(p.pid))
            time.sleep(300)
    """)
    first = group_serve("--app", app, *FAST)
    wait_for(first.registered)
    with litequeue.Queue(db_path) as q:
        q.enqueue("lingers")
    pid_file = tmp_path / "lingers.pid"
    wait_for(pid_file.exists)
    escaped = int(wait_for(lambda: pid_file.read_text()))
    left = wait_for(lambda: [g for g in group.subgroups() if "/child-" in g])
    first.proc.kill()                                   # kill -9: nothing cleans up
    first.proc.wait()
    assert psutil.pid_exists(escaped) and all(os.path.isdir(g) for g in left)
    second = group_serve("--app", app, *FAST)
    wait_for(second.registered)
    wait_for(lambda: not any(os.path.exists(g) for g in left), timeout=10)
    wait_for(lambda: not psutil.pid_exists(escaped) or
             psutil.Process(escaped).status() == psutil.STATUS_ZOMBIE, timeout=5)
    assert "removed the job cgroups left by supervisor pid %d" % first.pid in second.text()
    assert second.terminate() == 0


@needs_v1
def test_isolation_cgroup_where_groups_cannot_be_made_is_exit_2_and_auto_falls_back(
        tmp_path, db_path, group, group_serve):
    # Root without CAP_DAC_OVERRIDE (setpriv drops every capability) obeys the mode of the
    # group's directory, made read-only here: no group can be made below it.
    os.chmod(group.path, 0o555)
    os.chmod(tmp_path, 0o777)
    no_caps = ("setpriv", "--inh-caps=-all", "--bounding-set=-all")
    refused = group_serve("--isolation", "cgroup", *FAST, wrap=no_caps)
    assert refused.proc.wait(timeout=30) == 2
    text = refused.text().strip()
    assert len(text.splitlines()) == 1, text
    assert text == (f"litequeue: error: --isolation cgroup: cannot make cgroups below "
                    f"{group.path}: Permission denied (under systemd: Delegate=yes, and "
                    f"ProtectControlGroups off)")
    assert not os.path.exists(db_path)                 # bad input changes nothing

    server = group_serve("--app", write_app(tmp_path, APP), *FAST, wrap=no_caps)   # auto
    wait_for(server.registered)
    assert "memory isolation: rlimit (cannot make cgroups below " + group.path in server.text()
    assert status_json(db_path)["isolation"] == "rlimit"
    with litequeue.Queue(db_path) as q:
        done = q.enqueue("ok")
    assert settle(db_path, done).state == "done"
    assert server.terminate() == 0
    assert group.subgroups() == []


@needs_v1
def test_a_pooled_childs_group_limit_is_set_again_for_each_job(tmp_path, db_path, group,
                                                               group_serve):
    app = write_app(tmp_path, APP + """
    @queue.task(memory_limit="64M")
    def limit_small(ctx):
        return open_limit()

    @queue.task(memory_limit="300M")
    def limit_large(ctx):
        return open_limit()

    def open_limit():
        line = [l for l in open("/proc/self/cgroup").read().splitlines() if ":memory:" in l][0]
        path = "/sys/fs/cgroup/memory" + line.split(":", 2)[2]
        usage = int(open(path + "/memory.usage_in_bytes").read())
        return {"pid": os.getpid(), "limit": int(open(path + "/memory.limit_in_bytes").read()),
                "usage": usage}
    """)
    server = group_serve("--app", app, "--slots", "1", "--jobs-per-child", "10", *FAST)
    wait_for(server.registered)
    with litequeue.Queue(db_path) as q:
        small = q.enqueue("limit_small")
        large = q.enqueue("limit_large", delay=0.3)
    first, second = settle(db_path, small).result, settle(db_path, large).result
    assert first["pid"] == second["pid"]                         # one child ran both
    for result, limit in ((first, 64 * MiB), (second, 300 * MiB)):
        # the job's limit (on top of what the group held, when the child set it itself)
        assert limit <= result["limit"] < limit + 16 * MiB, (result, limit)
    assert server.terminate() == 0
    assert group.subgroups() == []


@needs_v1
def test_a_spare_child_waits_in_its_group_and_takes_the_next_job(tmp_path, db_path, group,
                                                                group_serve):
    """Moving a process into a v1 cgroup waits for an RCU grace period (milliseconds): the
    supervisor keeps one child forked ahead, already in its group, for the next job."""
    app = write_app(tmp_path, APP)
    server = group_serve("--app", app, *FAST)
    wait_for(server.registered)

    def spares():
        found = {}
        for sub in group.subgroups():
            procs = open(os.path.join(sub, "cgroup.procs")).read().split()
            if "/child-" in sub and procs:
                found[sub] = [int(p) for p in procs]
        return found

    with litequeue.Queue(db_path) as q:
        warm = q.enqueue("ok")                   # spares are kept while jobs come
    settle(db_path, warm)
    (spare_group, (spare_pid,)), = wait_for(spares).items()
    with litequeue.Queue(db_path) as q:
        first = q.enqueue("ok")
    assert settle(db_path, first).result["pid"] == spare_pid     # the spare ran it
    wait_for(lambda: not os.path.exists(spare_group))             # and its group went with it
    (next_group, (next_pid,)), = wait_for(spares).items()         # a new spare waits
    assert next_pid != spare_pid
    with litequeue.Queue(db_path) as q:
        second = q.enqueue("ok")
    assert settle(db_path, second).result["pid"] == next_pid
    assert "job %d ok started (attempt 1/3, pid %d)" % (second, next_pid) in server.text()
    wait_for(spares)
    assert server.terminate() == 0
    assert "Traceback" not in server.text()           # the waiting spare let go quietly
    assert group.subgroups() == []


def test_how_the_oom_killer_took_a_job_is_told_from_its_groups_counts(tmp_path):
    """A kill while the group hit its own limit is the job's limit; a kill without (the
    machine, or a group above, ran out) is said so; kills before the job started count for
    nothing (a reused group, an earlier job of a pooled child)."""
    own = fake_v2(tmp_path)
    groups = litequeue.JobCgroups(2, str(own))
    pool = litequeue.ChildPool(None, None, groups)
    path = own / "child-1"
    path.mkdir()
    events = path / "memory.events"

    class Run:
        oom_base = (3, 1)                  # as its S line said

    class Child:
        group, oom_base, current = str(path), (2, 1), Run()

    events.write_text("oom 1\noom_kill 3\n")
    assert pool.kernel_oom(Child) is None                     # all before the job started
    events.write_text("oom 2\noom_kill 4\n")
    assert pool.kernel_oom(Child) == "limit"
    events.write_text("oom 1\noom_kill 4\n")
    assert pool.kernel_oom(Child) == "outside"
    Child.current = None                                     # killed before it said S
    events.write_text("oom 1\noom_kill 3\n")
    assert pool.kernel_oom(Child) == "outside"


OOM_APP = APP + """
    # Shared memory, which the rlimit it inherits does not count: only the group stops it
    HOG = ("import mmap, time; m = mmap.mmap(-1, 300 << 20, flags=mmap.MAP_SHARED)\\n"
           "for o in range(0, 300 << 20, mmap.PAGESIZE): m[o] = 1\\n"
           "time.sleep(30)")

    @queue.task(max_attempts=1)
    def hog_program(ctx, check=True):
        import subprocess, sys
        done = subprocess.run([sys.executable, "-c", HOG])
        if check and done.returncode != 0:
            raise RuntimeError(f"the program ended {done.returncode}")
        return {"program": done.returncode}

    @queue.task(max_attempts=1)
    def nap(ctx):
        time.sleep(1.0)
        return {"pid": os.getpid()}
"""


@needs_v1
def test_a_job_failing_of_a_program_the_kernel_killed_says_so(tmp_path, db_path, group,
                                                              group_serve):
    server = group_serve("--app", write_app(tmp_path, OOM_APP), "--memory-limit", "100M",
                         *FAST)
    wait_for(server.registered)
    with litequeue.Queue(db_path) as q:
        failed = q.enqueue("hog_program")
    ended = settle(db_path, failed)
    assert ended.state == "dead"
    assert ended.error.startswith("memory limit exceeded (kernel)"), ended.error
    assert server.terminate() == 0


@needs_v1
def test_a_pooled_childs_next_job_is_not_blamed_for_an_earlier_kill(tmp_path, db_path, group,
                                                                    group_serve):
    server = group_serve("--app", write_app(tmp_path, OOM_APP), "--memory-limit", "100M",
                         "--slots", "1", "--jobs-per-child", "5", *FAST)
    wait_for(server.registered)
    with litequeue.Queue(db_path) as q:
        first = q.enqueue("hog_program", {"check": False})
        second = q.enqueue("nap")
    assert settle(db_path, first).state in ("done", "dead")    # its own kill: either way
    ended = settle(db_path, second)
    assert (ended.state, ended.attempts) == ("done", 1), ended.error
    assert server.terminate() == 0


@pytest.mark.parametrize("version, before, now, expected", [
    (2, (3, 1), (3, 1), None),             # no kill since
    (2, (3, 1), (4, 2), "limit"),          # killed, and the group hit its own limit
    (2, (3, 1), (4, 1), "outside"),        # killed, the group never hit its limit
    (1, (3, 0), (4, 1), "limit"),          # v1: the group's peak reached its limit
    (1, (3, 0), (4, 0), "outside"),
    (1, (0, 0), (0, 1), None),             # at its limit, nothing killed (cache reclaimed)
])
def test_oom_verdict(version, before, now, expected):
    assert litequeue.oom_verdict(version, before, now) == expected


def test_a_kill_outside_the_jobs_group_requeues_it_as_an_emergency_would(queue):
    """The machine (or the unit's MemoryMax) ran out, and the OOM killer took a job that
    was within its own limit: not the job's failure, not its breaker's."""
    queue.enqueue("echo")
    sup = litequeue.Supervisor(queue, isolation=litequeue.Isolation("rlimit", "test"))
    (job,) = queue.claim("w")
    run = litequeue._Run(job, None, 64 * MiB, 0.0)
    run.started_tick = 0.0
    sup._blame_kernel_oom(run, "outside")
    sup._end(run, current=True, exit_code=-9)
    # requeued (a breaker counts failures only), charged as it saved no checkpoint
    assert run.ending.state == litequeue.ENDING_REQUEUED
    assert run.ending.charge and run.ending.preempted
    assert "memory ran out outside the job's cgroup" in run.ending.reason
    limit = litequeue._Run(job, None, 64 * MiB, 0.0)
    sup._blame_kernel_oom(limit, "limit")
    sup._end(limit, current=True, exit_code=-9)
    assert limit.ending.state == litequeue.ENDING_FAILED and limit.ending.breaker_failure
    assert limit.ending.reason.startswith("memory limit exceeded (kernel): its cgroup reached")


@needs_v1
def test_groups_that_can_be_made_but_not_joined_are_found_at_start(monkeypatch):
    def refused(path):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(litequeue, "join_group", refused)      # what the forked probe runs
    with pytest.raises(litequeue.CgroupUnusable, match=r"cannot make cgroups below .*: "
                                                       r"Permission denied"):
        litequeue.JobCgroups.detect()
    assert not [name for name in os.listdir(V1) if name.startswith(f"litequeue-{os.getpid()}-")]
