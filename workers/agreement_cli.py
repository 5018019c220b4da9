"""``maskclip agreement --project ID``: compare a project's existing annotations with the proposals they started
from, in this terminal (no queue needed); the backend's project page shows the result."""

from __future__ import annotations

import click

from maskclip_service.errors import ServiceError
from maskclip_service.settings import Settings


@click.command()
@click.option("--project", type=int, required=True, help="The Label Studio project id.")
def agreement(project: int) -> None:
    """Compare every annotation of a project with its task's proposal: IoU per label, by model version.

    Uses the backend's environment (MODEL_DIR, and LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY or the link the
    project's /setup recorded). Records are kept in MODEL_DIR/project-N/agreement.jsonl.
    """
    from .agreement_job import compare_project

    try:
        Settings.from_env()
        result = compare_project(project, report=lambda fields: None)
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"project {project}: {result['compared']} annotations compared, {len(result['skipped'])} skipped")
    for row in result["agreement"]:
        labels = ", ".join(f"{name} {iou:.2f}" for name, iou in row["per_label"].items())
        click.echo(
            f"  {row['version']}: {row['annotations']} annotations, mean IoU {row['mean_iou']:.3f}, "
            f"kept {row['kept']:.0%} of the proposal ({labels or 'no labels drawn'})"
        )
    for item in result["skipped"][:20]:
        click.echo(f"  skipped annotation {item['annotation']} (task {item['task']}): {item['skipped']}")
