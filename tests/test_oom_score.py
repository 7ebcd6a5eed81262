"""Every job's child has its oom_score_adj raised by the job's priority (low highest,
critical lowest, all above the supervisor's), so a kernel OOM kill takes the least valuable
work first and never prefers the supervisor. Real children read their own score."""

import pytest

import litequeue


def read_own_score(ctx):
    with open("/proc/self/oom_score_adj") as f:
        return int(f.read())


@pytest.mark.parametrize("jobs_per_child", [1, 10])
def test_children_are_killable_by_priority_and_all_before_the_supervisor(queue, jobs_per_child):
    queue.task(name="score", max_attempts=1)(read_own_score)
    by_priority = {name: queue.enqueue("score", priority=name)
                   for name in ("low", "normal", "high", "critical")}
    supervisor_score = litequeue._oom_score_adj()
    sup = litequeue.Supervisor(queue, tasks=dict(queue.registry), burst=True, poll=0.05,
                               slots=1, jobs_per_child=jobs_per_child)
    assert sup.run() == 0
    scores = {name: queue.get(job_id).result for name, job_id in by_priority.items()}
    assert all(score is not None for score in scores.values()), scores
    assert supervisor_score < scores["critical"], scores
    if jobs_per_child == 1:
        # critical first (claim order), then a fresh child each: strictly by priority
        assert scores["critical"] < scores["high"] < scores["normal"] < scores["low"], scores
        assert scores["low"] == min(1000, supervisor_score + litequeue.OOM_SCORE_BY_PRIORITY[3])
    else:
        # one reused child, jobs claimed critical first: its score only ever rises
        assert scores["critical"] <= scores["high"] <= scores["normal"] <= scores["low"]
