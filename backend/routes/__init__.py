"""The HTTP routes, one module per part of Label Studio's ML backend protocol (and ours beside it)."""

from . import health, metrics, predict, project_page, review, setup, training, webhook

BLUEPRINTS = (health.bp, setup.bp, predict.bp, webhook.bp, training.bp, metrics.bp, review.bp, project_page.bp)
