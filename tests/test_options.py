"""Task options (priority aside) resolve when a job is claimed: the job's own overrides, else
the claimer's declaration of its task, else the stored catalogue, else the global defaults."""

import litequeue

MiB = 2**20


def test_a_job_enqueued_before_its_task_was_declared_gets_the_declaration_at_claim(db_path):
    with litequeue.Queue(db_path) as cron, litequeue.Queue(db_path) as app:
        job_id = cron.enqueue("resize", {"image": 7})          # no code, no catalogue row
        assert not cron.is_known_task("resize")
        queued = cron.get(job_id)
        assert (queued.max_attempts, queued.timeout_s, queued.memory_limit_bytes) == (
            litequeue.DEFAULT_MAX_ATTEMPTS, None, None)

        @app.task(max_attempts=1, timeout=1, memory_limit="100M")
        def resize(ctx, image):
            return image

        (job,) = app.claim("sup", tasks=app.registry)
        assert job.id == job_id
        assert (job.max_attempts, job.timeout_s, job.memory_limit_bytes) == (1, 1.0, 100 * MiB)
        stored = cron.get(job_id)                              # the row records what applied
        assert (stored.max_attempts, stored.timeout_s, stored.memory_limit_bytes) == (
            1, 1.0, 100 * MiB)
        assert app.fail(job_id, "sup", job.attempts, "boom") == litequeue.DEAD   # 1 attempt


def test_the_claimers_declaration_comes_before_the_catalogue(db_path):
    with litequeue.Queue(db_path) as app, litequeue.Queue(db_path) as other_app:
        @app.task(max_attempts=1, memory_limit="100M")         # no timeout: none
        def resize(ctx):
            return None

        other_app.task(lambda ctx: None, name="resize", max_attempts=4, timeout=40)
        assert app.catalogue()["resize"].timeout_s == 40        # the other app stored last
        other_app.enqueue("resize")                             # 4 attempts, 40 s, there
        (job,) = app.claim("sup", tasks=app.registry)
        assert (job.max_attempts, job.timeout_s, job.memory_limit_bytes) == (1, None, 100 * MiB)


def test_options_the_job_set_itself_are_kept(db_path):
    with litequeue.Queue(db_path) as cron, litequeue.Queue(db_path) as app:
        first = cron.enqueue("resize", max_attempts=5)
        second = cron.enqueue("resize", timeout="2m", memory_limit="1G")
        third, fourth = cron.enqueue_many([{"task": "resize", "max_attempts": 6}, "resize"])

        @app.task(max_attempts=1, timeout=1, memory_limit="100M")
        def resize(ctx):
            return None

        jobs = {job.id: job for job in app.claim("sup", tasks=app.registry, limit=4)}
        options = {job_id: (job.max_attempts, job.timeout_s, job.memory_limit_bytes)
                   for job_id, job in jobs.items()}
        assert options == {first: (5, 1.0, 100 * MiB), second: (1, 120.0, 2**30),
                           third: (6, 1.0, 100 * MiB), fourth: (1, 1.0, 100 * MiB)}


def test_a_job_follows_the_catalogue_as_it_is_when_claimed(db_path):
    with litequeue.Queue(db_path) as producer:
        producer.task(lambda ctx: None, name="report", max_attempts=7, timeout=30,
                      memory_limit="64M")
    with litequeue.Queue(db_path) as cron:                  # no code: the catalogue only
        first, second = cron.enqueue("report"), cron.enqueue("report")
        assert cron.get(first).max_attempts == 7
    with litequeue.Queue(db_path) as redeployed:
        redeployed.task(lambda ctx: None, name="report", max_attempts=2, timeout=5)
    with litequeue.Queue(db_path) as worker:                 # declares nothing itself
        by_name = worker.claim("w", tasks=["report"])         # names, not declarations
        anything = worker.claim("w")
        for job in by_name + anything:
            assert (job.max_attempts, job.timeout_s, job.memory_limit_bytes) == (2, 5.0, None)
        assert [job.id for job in by_name + anything] == [first, second]


def test_a_task_in_no_catalogue_gets_the_global_defaults(queue):
    job_id = queue.enqueue("nosuchtask")
    (job,) = queue.claim("w", tasks=["nosuchtask"])
    assert (job.id, job.max_attempts, job.timeout_s, job.memory_limit_bytes) == (
        job_id, litequeue.DEFAULT_MAX_ATTEMPTS, None, None)
