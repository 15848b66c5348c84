//! A Celery message as kombu's Redis transport stores it, for both benchmarks (`autoscale` and
//! `fleet`).

use serde_json::json;

/// Message `n` of `queue` (a task `add(1, 1)`); the autoscaler counts list entries, the content
/// only has to look real. Ids and delivery tags are unique per queue and `n`.
pub fn kombu_message(queue: &str, n: usize) -> String {
    let id = format!("bench-{queue}-{n:08}");
    json!({
        "body": "W1sxLCAxXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d",
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "celery_example.add", "id": id, "retries": 0,
                    "root_id": id, "parent_id": null, "argsrepr": "(1, 1)", "kwargsrepr": "{}"},
        "properties": {"correlation_id": id, "reply_to": "", "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": format!("tag-{id}")},
    })
    .to_string()
}
