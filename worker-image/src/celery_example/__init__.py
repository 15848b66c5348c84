"""Small example Celery app used by the demo and the e2e tests: ``celery -A celery_example``."""

from .app import app

__all__ = ["app"]
