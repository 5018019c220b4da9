"""The old path of the training job: jobs queued by earlier versions name ``workers.jobs.train_project``.

Kept importable for as long as such jobs may wait in a queue (see
:data:`maskclip_service.job_paths.LEGACY`); new jobs name
``workers.training_job.train_project``.
"""

from .training_job import train_project

__all__ = ["train_project"]
