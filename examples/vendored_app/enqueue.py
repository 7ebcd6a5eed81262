"""Enqueue the app's work. Runs from any directory: Python puts this file's directory first
on sys.path, so `import tasks` and the vendored `litequeue` are found beside it."""

from tasks import alert, housekeeping, queue, summarize, upload_backlog

THRESHOLD = 30.0
READINGS = {
    "greenhouse": [21.5, 22.0, 23.5, 24.0],
    "boiler": [28.0, 31.5, 35.0, 29.0],
    "cellar": [12.0, 12.5, 12.0, 11.5],
}

for sensor, readings in READINGS.items():
    job_id = summarize.enqueue(sensor=sensor, readings=readings)
    print(f"summarize {sensor}: job {job_id}")
    peak = max(readings)
    if peak > THRESHOLD:
        print(f"alert {sensor}: job {alert.enqueue(sensor=sensor, value=peak, threshold=THRESHOLD)}")

print(f"upload_backlog: job {upload_backlog.enqueue(batches=10)}")

# unique=True: the second enqueue finds the first one waiting and returns its id.
first, second = housekeeping.enqueue(), housekeeping.enqueue()
print(f"housekeeping: job {first}, enqueued again: job {second} (the same one)")

# Per-job options override the task's declared defaults.
urgent = summarize.enqueue_with({"sensor": "door", "readings": [1, 0, 1]}, priority="critical")
print(f"summarize door (critical): job {urgent}")
queue.close()
