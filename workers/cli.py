"""``maskclip-worker`` and the ``maskclip train`` / ``maskclip jobs`` commands."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import click
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus
from tqdm import tqdm

from maskclip_service.defaults import QUEUE_NAME
from maskclip_service.errors import ServiceError
from maskclip_service.redis_connection import connect
from maskclip_service.settings import Settings
from maskclip_service.training_queue import enqueue_training, recent_jobs

from .predict_cli import runs_table

# torch and CLIP are imported where they are used: an idle worker started with
# --no-preload holds neither until its first job.


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command()
@click.option("--redis-url", envvar="REDIS_URL", required=True, help="The queue's Redis (redis:// or unix://).")
@click.option("--queue", "queue_name", envvar="MASKCLIP_QUEUE", default=QUEUE_NAME, show_default=True)
@click.option("--burst", is_flag=True, help="Stop when the queue is empty.")
@click.option("--preload/--no-preload", default=True, show_default=True, help="Load CLIP before the first job.")
@click.option("--log-level", envvar="LOG_LEVEL", default="INFO", show_default=True)
def worker(redis_url: str, queue_name: str, burst: bool, preload: bool, log_level: str) -> None:
    """Run training jobs. CLIP is loaded once per process and reused by every job.

    Jobs run in this process (no fork per job), which keeps the model loaded
    and is safe with CUDA.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings()
    if preload:
        from .context import shared_segmenter

        shared_segmenter(settings)
    # A worker waits out a Redis restart (about 15 s) rather than losing a finished job's result.
    connection = connect(redis_url, retries=10)
    SimpleWorker([Queue(queue_name, connection=connection)], connection=connection).work(
        burst=burst, logging_level=log_level.upper()
    )


@click.command()
@click.option("--project", type=int, required=True, help="The Label Studio project id.")
@click.option("--redis-url", envvar="REDIS_URL", required=True)
@click.option("--wait", is_flag=True, help="Follow the job's progress until it ends.")
def train(project: int, redis_url: str, wait: bool) -> None:
    """Queue training for a project (as Label Studio's Start Training button does)."""
    settings = _settings()
    connection = connect(redis_url)
    job_id, created = enqueue_training(
        connection, project, trigger="cli", queue_name=settings.queue_name, job_timeout=settings.job_timeout
    )
    click.echo(f"{'queued' if created else 'already queued or running'}: job {job_id} for project {project}")
    if wait:
        _follow(Job.fetch(job_id, connection=connection))


def _follow(job: Job) -> None:
    bar = tqdm(desc=f"project {job.meta.get('project')}", unit="step")
    try:
        while True:
            status = job.get_status()
            job.refresh()
            meta = job.meta
            if meta.get("iterations"):
                bar.total = meta["iterations"]
                bar.n = meta.get("step", 0)
            bar.set_postfix(phase=meta.get("phase"), loss=f"{meta.get('loss', 0):.3f}", refresh=True)
            if status in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                break
            time.sleep(1)
    finally:
        bar.close()
    if status == JobStatus.FINISHED:
        click.echo(json.dumps(job.return_value(), indent=2))
    else:
        raise click.ClickException(f"job {job.id} {status}: {(job.exc_info or '').strip().splitlines()[-1:]}")


@click.command()
@click.option("--redis-url", envvar="REDIS_URL", required=True)
@click.option("--limit", type=int, default=20, show_default=True)
def jobs(redis_url: str, limit: int) -> None:
    """Recent training and pre-annotation jobs, then the pre-annotation runs and their progress."""
    settings = _settings()
    rows = []
    for job in recent_jobs(connect(redis_url), settings.queue_name, limit):
        meta = job.meta
        progress = f"{meta.get('step', 0)}/{meta['iterations']}" if meta.get("iterations") else ""
        if "total" in meta:  # a pre-annotation job: tasks done of its run
            progress = f"{meta.get('done', 0)}/{meta['total']} tasks, {meta.get('failed', 0)} failed"
        outcome = ""
        if job.get_status() == JobStatus.FINISHED and isinstance(job.return_value(), dict):
            outcome = job.return_value().get("reason", "")
        elif job.get_status() == JobStatus.FAILED:
            outcome = (job.exc_info or "").strip().splitlines()[-1] if job.exc_info else "failed"
        when = job.enqueued_at.strftime("%Y-%m-%d %H:%M") if job.enqueued_at else ""
        rows.append(
            (
                job.id,
                str(meta.get("project", "")),
                when,
                job.get_status().value,
                str(meta.get("phase", "")),
                progress,
                outcome,
            )
        )
    if rows:
        headers = ("job", "project", "queued", "status", "phase", "step", "outcome")
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        for row in rows:
            click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    else:
        click.echo("no jobs")
    click.echo("")
    for line in runs_table(connect(redis_url)) or ["no pre-annotation runs"]:
        click.echo(line)


@click.command()
@click.option("--project", type=int, required=True, help="The Label Studio project id.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write review.json, index.html and its pictures here.",
)
def review(project: int, out_dir: Path | None) -> None:
    """Find the project's annotations that are probably wrong, judged by models that did not train on them.

    Runs here, with the backend's environment (no queue needed). The review is
    also kept in the project's folder under MODEL_DIR, where the backend
    serves the latest at /review/<project>.
    """
    from .review_job import review_project

    _settings()
    bar = tqdm(desc=f"reviewing project {project}", unit="step", disable=None)

    def report(fields: dict) -> None:
        for done, total in (("step", "iterations"), ("fetched", "tasks"), ("judged", "annotations")):
            if done in fields and total in fields:
                bar.total, bar.n = fields[total], fields[done]
        shown = {k: fields[k] for k in ("phase", "fold", "folds") if k in fields}
        bar.set_postfix(shown, refresh=True)

    try:
        result = review_project(project, trigger="cli", out=str(out_dir) if out_dir else None, report=report)
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        bar.close()
    click.echo(
        f"project {project}: {result['annotations']} annotations reviewed, {result['flagged']} flagged as "
        f"probably wrong; see {Path(out_dir or result['folder']) / 'index.html'}"
    )


@click.command("eval-project")
@click.option("--project", type=int, required=True, help="The Label Studio project id.")
@click.option(
    "--config",
    "configs",
    multiple=True,
    help="Configurations to score as in `maskclip eval`; default: MaskCLIP and the active student.",
)
@click.option(
    "--out",
    "out_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the JSON report here.",
)
def eval_project(project: int, configs: tuple[str, ...], out_file: Path | None) -> None:
    """mIoU of MaskCLIP and the project's students against the project's accepted annotations."""
    from maskclip_engine import MaskClipError

    from .eval_job import eval_project as run_eval

    _settings()
    try:
        report = run_eval(
            project,
            list(configs),
            out=str(out_file) if out_file is not None else None,
            progress=lambda it: tqdm(it, desc="evaluating", unit="image", disable=None),
        )
    except (ServiceError, MaskClipError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"project {project}: {report['samples']} annotated images")
    click.echo(report["table"])


if __name__ == "__main__":
    worker()
