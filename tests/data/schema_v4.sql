-- litequeue schema, version 4 (PRAGMA user_version = 4).
-- This file is the whole current schema. Connection pragmas (WAL, synchronous, busy
-- timeout) live in litequeue.py; schema changes get a migration step there too.
-- Times are epoch seconds (REAL), always bound from Python, never computed in SQL.

-- Small key/value facts about the file: max_depth, last heartbeat.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT
) WITHOUT ROWID;

-- The task catalogue: every task's declared defaults, so an enqueue by name from any
-- process (cron, another app) uses them without importing code.
CREATE TABLE tasks (
    name               TEXT PRIMARY KEY,
    priority           INTEGER NOT NULL,
    max_attempts       INTEGER NOT NULL,
    timeout_s          REAL,
    memory_limit_bytes INTEGER,
    ttl_s              REAL,
    shed               INTEGER NOT NULL DEFAULT 0,
    unique_task        INTEGER NOT NULL DEFAULT 0,
    updated_at         REAL NOT NULL,
    breaker_failures   INTEGER,                  -- NULL: the supervisor's --breaker-failures
    breaker_window_s   REAL                      -- NULL: the supervisor's --breaker-window
) WITHOUT ROWID;                                 -- (v2: the breaker columns, added last)

CREATE TABLE jobs (
    id                 INTEGER PRIMARY KEY,
    task               TEXT NOT NULL,
    payload            TEXT NOT NULL DEFAULT 'null',       -- JSON
    priority           INTEGER NOT NULL CHECK (priority BETWEEN 0 AND 3),
    state              TEXT NOT NULL CHECK (state IN
                         ('queued', 'running', 'done', 'dead', 'cancelled', 'skipped')),
    unique_key         TEXT,
    attempts           INTEGER NOT NULL DEFAULT 0,         -- starts charged so far
    max_attempts       INTEGER NOT NULL,
    timeout_s          REAL,
    memory_limit_bytes INTEGER,
    shed               INTEGER NOT NULL DEFAULT 0,
    created_at         REAL NOT NULL,
    due_at             REAL NOT NULL,                      -- not claimable before this
    expires_at         REAL,                               -- due_at + ttl: skipped after this
    started_at         REAL,                               -- of the current or last run
    finished_at        REAL,                               -- when it became final
    owner              TEXT,                               -- supervisor id holding the lease
    pid                INTEGER,                            -- child running it
    cancel_requested   INTEGER NOT NULL DEFAULT 0,
    preemptions        INTEGER NOT NULL DEFAULT 0,
    recoveries         INTEGER NOT NULL DEFAULT 0,         -- requeued after its supervisor died
    result             TEXT,                               -- JSON
    error              TEXT,
    checkpoint         TEXT,                               -- JSON, the last ctx.save()
    checkpoint_at      REAL,
    progress_done      REAL,
    progress_total     REAL,
    -- Which of max_attempts (1), timeout_s (2), memory_limit_bytes (4) the job set itself.
    -- The others resolve when it is claimed (the claimer's declaration of the task, else
    -- the catalogue, else the global defaults); before that they hold enqueue's guess.
    -- v3, added last; the default keeps rows of older files exactly as they were.
    overrides          INTEGER NOT NULL DEFAULT 7
);

-- The claim path: per priority, due time then id, over waiting jobs only.
CREATE INDEX jobs_claim ON jobs (priority, due_at, id) WHERE state = 'queued';
-- TTL sweep.
CREATE INDEX jobs_expiry ON jobs (expires_at) WHERE state = 'queued' AND expires_at IS NOT NULL;
-- Lease recovery and status of what runs.
CREATE INDEX jobs_running ON jobs (owner) WHERE state = 'running';
-- Retention: final jobs by age.
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
-- A claimer that may not run the jobs at the front of jobs_claim (another supervisor's
-- tasks, an open breaker) seeks each task it may run here instead of scanning past them.
CREATE INDEX jobs_task_queue ON jobs (task, priority, due_at, id) WHERE state = 'queued';
-- At most one waiting or running job per unique key: the database itself enforces it.
CREATE UNIQUE INDEX jobs_unique ON jobs (unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('queued', 'running');

-- Every state change and every supervisor decision, with the pressure that caused it.
CREATE TABLE events (
    id         INTEGER PRIMARY KEY,
    at         REAL NOT NULL,
    job_id     INTEGER,          -- NULL for supervisor-level events (level, breaker)
    task       TEXT,
    kind       TEXT NOT NULL,    -- 'job', 'level', 'breaker', 'decision'
    from_state TEXT,
    to_state   TEXT,
    reason     TEXT,
    pressure   REAL
);
-- Purge finds old job-less events through this index too (job_id IS NULL), so an enqueue
-- writes no second events index.
CREATE INDEX events_job ON events (job_id);

-- Circuit breakers, one per task name, shared by every supervisor on the file.
CREATE TABLE breakers (
    task         TEXT PRIMARY KEY,
    state        TEXT NOT NULL DEFAULT 'closed'
                   CHECK (state IN ('closed', 'open', 'half-open')),
    failures     TEXT NOT NULL DEFAULT '[]',   -- JSON list of recent failure times
    opened_at    REAL,
    cooldown_s   REAL,
    trial_job_id INTEGER,
    updated_at   REAL NOT NULL
) WITHOUT ROWID;

-- Live supervisors: leases are held through these rows.
CREATE TABLE supervisors (
    id           TEXT PRIMARY KEY,    -- host:pid:start
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    tasks        TEXT NOT NULL,       -- JSON list of task names it serves
    level        TEXT NOT NULL DEFAULT 'normal',
    pressure     REAL,
    running      TEXT NOT NULL DEFAULT '[]'   -- JSON: [{id, task, rss_bytes}] for status
) WITHOUT ROWID;

-- v4: memory pressure over time, for the dashboard's chart. A live supervisor adds a row at
-- most every 5 s and deletes rows older than 24 h: at most ~17k rows a supervisor.
CREATE TABLE pressure_samples (
    id         INTEGER PRIMARY KEY,
    at         REAL NOT NULL,
    supervisor TEXT NOT NULL,            -- supervisors.id of the one that sampled
    pressure   REAL NOT NULL,            -- percent, as the levels use it
    level      TEXT NOT NULL,
    tree_bytes INTEGER                   -- its process tree's PSS; NULL without a budget
);
CREATE INDEX pressure_samples_at ON pressure_samples (at);

-- v4: finished jobs no longer in `jobs` in that state (purged, or retried by hand), per task
-- and final state: with the final jobs still there, the litequeue_jobs_finished_total
-- counter, which then never goes down.
CREATE TABLE finished_counts (
    task  TEXT NOT NULL,
    state TEXT NOT NULL,
    n     INTEGER NOT NULL,
    PRIMARY KEY (task, state)
) WITHOUT ROWID;
