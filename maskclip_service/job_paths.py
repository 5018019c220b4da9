"""The functions queued jobs name: the contract between whoever queues work and the workers that run it.

RQ stores a job's function as a dotted path and imports it when a worker takes
the job, so these strings outlive the code that queued them: a path never
changes meaning. When a job function moves, its old path stays importable (a
module that re-exports it) for as long as jobs queued under it may exist;
``LEGACY`` lists those.
"""

from __future__ import annotations

TRAIN_PROJECT = "workers.training_job.train_project"
PLAN_PREANNOTATION = "workers.preannotate.plan_run"
WORK_PREANNOTATION = "workers.preannotate.work_run"
REVIEW_PROJECT = "workers.review_job.review_project"
COMPARE_ANNOTATION = "workers.agreement_job.compare_annotation"
COMPARE_PROJECT = "workers.agreement_job.compare_project"

PREANNOTATION_JOBS = {"plan_run": PLAN_PREANNOTATION, "work_run": WORK_PREANNOTATION}

# Paths of jobs queued by earlier versions, and what now runs them.
LEGACY = {"workers.jobs.train_project": TRAIN_PROJECT}
