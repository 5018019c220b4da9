"""Every time-to-live, limit and lease time of the queue, in one place (as RQ keeps its own in ``defaults.py``).

The queue's modules and the workers import these rather than writing the
numbers again, so a change here changes every place that relies on it. The
settings a deployment may change (``MASKCLIP_JOB_TIMEOUT``,
``MASKCLIP_PREANNOTATE_LEASE_S``, ...) start from the values here.
"""

from __future__ import annotations

MINUTE_S = 60
HOUR_S = 3600
DAY_S = 24 * HOUR_S
WEEK_S = 7 * DAY_S

QUEUE_NAME = "maskclip-training"  # the RQ queue every job goes to (MASKCLIP_QUEUE)

# Jobs
JOB_TIMEOUT_S = 6 * HOUR_S  # the longest a training, review or pre-annotation job may run
RESULT_TTL_S = WEEK_S  # a finished training or review job's result stays listed this long
FAILURE_TTL_S = WEEK_S  # so does a failed job's traceback
PREANNOTATION_RESULT_TTL_S = DAY_S  # a pre-annotation job's result: its run keeps the totals
HEARTBEAT_S = 10  # a running training job refreshes meta["heartbeat"] this often
LOST_AFTER_S = 2 * MINUTE_S  # a job or run silent this long lost its worker (killed, machine gone)
TRAINING_KEY_TTL_S = JOB_TIMEOUT_S + HOUR_S  # a project's live-job key outlives the longest job it can name

# Locks
ACTIVATION_LOCK_S = 2 * MINUTE_S  # a worker killed while activating holds the project's lock at most this long

# Pre-annotation runs
RUN_TTL_S = WEEK_S  # a run's state hash expires this long after it started, if nothing ends it
FINISHED_RUN_TTL_S = DAY_S  # every key of a finished run expires this long after its end
PLANNER_TTL_S = 10 * MINUTE_S  # a planner refreshes its lock while it lists tasks; a killed one frees it after this
LEASE_S = MINUTE_S  # a chunk whose worker is silent this long is taken over (MASKCLIP_PREANNOTATE_LEASE_S)
MAX_WORK_JOBS = 32  # work jobs queued per planning round; each takes chunks until none are left
MAX_ATTEMPTS = 3  # a chunk that fails this often (Label Studio refusing the import, say) is given up
FAILURES_KEPT = 200  # the latest failed tasks a run remembers, with their reasons
FAILURE_REASON_CHARS = 200  # a failure's reason is cut to this many characters
TASK_PAGE = 100  # tasks per page when a planner lists a project
TASKS_PER_LISTING = 500  # task ids per Data Manager query (a query names them all)

# Reviews
REVIEW_TIMEOUT_S = JOB_TIMEOUT_S
