//! A Celery client of the stack: send the example app's tasks and read their results, from
//! Python in the harness venv.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Result, Stack, StackError, workspace_root};

impl Stack {
    /// Environment for a Celery client of the stack: broker, result backend, and the example app
    /// importable.
    pub fn celery_env(&self) -> Vec<(String, String)> {
        vec![
            ("CELERY_BROKER_URL".into(), self.broker_url.clone()),
            ("CELERY_RESULT_BACKEND".into(), self.result_backend_url.clone()),
            ("PYTHONPATH".into(), workspace_root().join("worker-image/src").display().to_string()),
        ]
    }

    /// Runs a Python snippet in the harness venv with [`Stack::celery_env`] (plus `env`) and
    /// returns its stdout.
    pub async fn python(&self, code: &str, env: &[(&str, &str)]) -> Result<String> {
        let mut all = self.celery_env();
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let code = code.to_string();
        tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            e2e_harness::python::run_script(&code, &env)
        })
        .await
        .expect("python thread")
        .map_err(Into::into)
    }

    /// Sends real Celery tasks of the example app — `(task name, args, queue)` — and returns their
    /// ids in order.
    pub async fn send_tasks(&self, tasks: &[(&str, Value, &str)]) -> Result<Vec<String>> {
        let tasks: Vec<Value> = tasks.iter().map(|(name, args, queue)| json!([name, args, queue])).collect();
        let out = self.python(SEND_TASKS, &[("E2E_TASKS", &Value::Array(tasks).to_string())]).await?;
        serde_json::from_str(out.trim()).map_err(|e| StackError::Invalid(format!("send_tasks output {out:?}: {e}")))
    }

    /// Waits (polling the result backend, up to `timeout`) until every task finished, and returns
    /// them in order. Fails on timeout, listing the states.
    pub async fn wait_results(&self, ids: &[String], timeout: Duration) -> Result<Vec<TaskResult>> {
        let out = self
            .python(
                WAIT_RESULTS,
                &[("E2E_TASK_IDS", &json!(ids).to_string()), ("E2E_TIMEOUT", &timeout.as_secs_f64().to_string())],
            )
            .await?;
        let results: Vec<TaskResult> = serde_json::from_str(out.trim())
            .map_err(|e| StackError::Invalid(format!("wait_results output {out:?}: {e}")))?;
        if results.iter().all(TaskResult::finished) {
            Ok(results)
        } else {
            let states: Vec<&str> = results.iter().map(|r| r.state.as_str()).collect();
            Err(StackError::Timeout { what: format!("task results (states {states:?})"), after: timeout })
        }
    }
}

const SEND_TASKS: &str = r#"
import json, os
from celery_example.app import app
ids = []
for name, args, queue in json.loads(os.environ["E2E_TASKS"]):
    ids.append(app.send_task(name, args=args, queue=queue).id)
print(json.dumps(ids))
"#;

const WAIT_RESULTS: &str = r#"
import json, os, time
from celery.result import AsyncResult
from celery_example.app import app
results = [AsyncResult(i, app=app) for i in json.loads(os.environ["E2E_TASK_IDS"])]
deadline = time.monotonic() + float(os.environ["E2E_TIMEOUT"])
while not all(r.ready() for r in results) and time.monotonic() < deadline:
    time.sleep(0.1)
out = []
for r in results:
    value = r.result if r.ready() else None
    if isinstance(value, BaseException):
        value = repr(value)
    out.append({"id": r.id, "state": r.state, "result": value})
print(json.dumps(out))
"#;

/// A Celery task's outcome as the result backend holds it.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct TaskResult {
    pub id: String,
    /// `SUCCESS`, `FAILURE`, `PENDING`, `STARTED`, ...
    pub state: String,
    /// The return value (or the exception's repr on failure).
    pub result: Value,
}

impl TaskResult {
    fn finished(&self) -> bool {
        matches!(self.state.as_str(), "SUCCESS" | "FAILURE" | "REVOKED")
    }

    /// The worker hostname the example app's `sleep`/`hold`/`tick` tasks report.
    pub fn hostname(&self) -> Option<&str> {
        self.result["hostname"].as_str()
    }

    /// The process id the example app's `sleep`/`hold`/`tick` tasks report.
    pub fn pid(&self) -> Option<u32> {
        self.result["pid"].as_u64().and_then(|p| u32::try_from(p).ok())
    }
}
