//! Real broker processes and the Celery virtualenv for tests.
