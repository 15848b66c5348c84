//! Celery worker events (worker-heartbeat, worker-online, worker-offline) from the broker: which
//! workers are alive and how many tasks each is running. Being written.
