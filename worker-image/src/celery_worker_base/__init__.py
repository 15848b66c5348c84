"""Celery worker base image: in-process entrypoint, file-based probes, safe defaults.

Kept empty on purpose: ``celery-probe`` imports this package, and a probe must
not pull in Celery, a broker client or the user's app.
"""
