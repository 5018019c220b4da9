"""``maskclip predict``: pre-annotate a whole project from a terminal, and the runs table of ``maskclip jobs``."""

from __future__ import annotations

import time

import click
from redis import Redis
from tqdm import tqdm

from maskclip_service import preannotation_runs as runs
from maskclip_service.defaults import LOST_AFTER_S
from maskclip_service.errors import ServiceError
from maskclip_service.redis_connection import connect
from maskclip_service.settings import Settings


@click.command()
@click.option("--project", type=int, required=True, help="The Label Studio project id.")
@click.option("--redis-url", envvar="REDIS_URL", required=True, help="The queue's Redis (redis:// or unix://).")
@click.option(
    "--version",
    default=None,
    help="Write this version's proposals (MaskCLIP's or a student's, e.g. student-p3-v2); default: the "
    "project's current model.",
)
@click.option("--wait", is_flag=True, help="Follow the run with a progress bar until it ends.")
@click.option("--set-project-version", is_flag=True, help="When done, make the project show this version.")
def predict(project: int, redis_url: str, version: str | None, wait: bool, set_project_version: bool) -> None:
    """Queue proposals for every task of a project that lacks them; workers write them into Label Studio."""
    try:
        settings = Settings.from_env()
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from exc
    connection = connect(redis_url)
    run, status = runs.queue_preannotation(
        connection, settings, project, version=version, trigger="cli", set_project_version=set_project_version
    )
    click.echo(f"{status}: pre-annotation run {run} for project {project}")
    if wait:
        follow(connection, run)


def follow(connection: Redis, run: str, poll_s: float = 1.0) -> dict:
    """A progress bar over the run until it is done; returns its final state."""
    bar = tqdm(desc=f"run {run}", unit="task", disable=None)
    try:
        while True:
            state = runs.state(connection, run)
            if not state:
                raise click.ClickException(f"run {run} is gone (expired from Redis).")
            bar.total = state.get("total") or None
            bar.n = state.get("done", 0)
            bar.set_postfix(phase=state.get("phase"), failed=state.get("failed", 0), refresh=True)
            if state.get("phase") == "done":
                break
            if time.time() - float(state.get("heartbeat", 0)) > LOST_AFTER_S:
                bar.set_postfix(phase="silent: is a worker running?", refresh=True)
            time.sleep(poll_s)
    finally:
        bar.close()
    click.echo(
        f"project {state.get('project')}: {state.get('predicted', 0)} predicted, {state.get('skipped', 0)} "
        f"already had {state.get('version')} or were annotated, {state.get('failed', 0)} failed "
        f"({state.get('tasks_per_second', 0)} tasks/s)"
    )
    return state


def runs_table(connection: Redis, limit: int = 10) -> list[str]:
    """Lines for ``maskclip jobs``: recent pre-annotation runs with their progress."""
    rows = []
    for state in runs.runs(connection, limit):
        rows.append(
            (
                state["run"],
                str(state.get("project", "")),
                str(state.get("version", "")),
                str(state.get("phase", "")),
                f"{state.get('done', 0)}/{state.get('total', 0)}",
                str(state.get("failed", 0)),
                f"{state.get('tasks_per_second', 0):.2f}",
            )
        )
    if not rows:
        return []
    headers = ("run", "project", "version", "phase", "done", "failed", "tasks/s")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return lines
