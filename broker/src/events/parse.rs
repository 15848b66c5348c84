//! Reading one message as a worker event: kombu's Redis envelope around the event, or the bare
//! AMQP body. Pure functions; malformed input is an [`EventError`], never a panic.

use std::time::Duration;

use base64::Engine;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde_json::Value;

/// Celery's default heartbeat interval, used when an event carries no usable `freq`.
const DEFAULT_FREQ: Duration = Duration::from_secs(2);
const MIN_FREQ: Duration = Duration::from_millis(100);
const MAX_FREQ: Duration = Duration::from_secs(3600);

/// Kombu encodes the body with Python's `base64.b64encode` (standard alphabet, padded); padding is
/// not required and unused trailing bits are not checked.
const BODY_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// What a worker event announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerEventKind {
    Online,
    Heartbeat,
    Offline,
}

/// One worker event, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEvent {
    pub kind: WorkerEventKind,
    pub hostname: String,
    /// Tasks executing when the event was sent (0 when a `worker-offline` omits it).
    pub active: u32,
    /// Tasks the worker started since it started.
    pub processed: u64,
    /// The worker's heartbeat interval (2 s unless the worker is configured otherwise), clamped
    /// to 0.1 s – 1 h.
    pub freq: Duration,
}

/// Why a message could not be read as an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("not a JSON object")]
    NotJson,
    #[error("unsupported content type {0} (only application/json events are read)")]
    ContentType(String),
    #[error("body is not valid base64")]
    Base64,
    #[error("field {0} is missing or has the wrong type")]
    Field(&'static str),
}

/// Parses a message from a Redis events channel: kombu's JSON envelope around the event.
/// `Ok(None)` for a well-formed event that is not a worker event this module tracks.
pub fn parse_redis_message(payload: &[u8]) -> Result<Option<WorkerEvent>, EventError> {
    let envelope: Value = serde_json::from_slice(payload).map_err(|_| EventError::NotJson)?;
    let envelope = envelope.as_object().ok_or(EventError::NotJson)?;
    let body = envelope.get("body").and_then(Value::as_str).ok_or(EventError::Field("body"))?;
    let encoding = envelope.get("properties").and_then(|p| p.get("body_encoding")).and_then(Value::as_str);
    let body = match encoding {
        Some("base64") => BODY_BASE64.decode(body).map_err(|_| EventError::Base64)?,
        _ => body.as_bytes().to_vec(),
    };
    parse_event_body(&body, envelope.get("content-type").and_then(Value::as_str))
}

/// Parses an event body (the AMQP message body, or the decoded body of a Redis envelope) with its
/// content type. `Ok(None)` for a well-formed event that is not a worker event this module tracks.
pub fn parse_event_body(body: &[u8], content_type: Option<&str>) -> Result<Option<WorkerEvent>, EventError> {
    if let Some(content_type) = content_type {
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(EventError::ContentType(content_type.chars().take(64).collect()));
        }
    }
    let event: Value = serde_json::from_slice(body).map_err(|_| EventError::NotJson)?;
    let event = event.as_object().ok_or(EventError::NotJson)?;
    let kind = match event.get("type").and_then(Value::as_str).ok_or(EventError::Field("type"))? {
        "worker-online" => WorkerEventKind::Online,
        "worker-heartbeat" => WorkerEventKind::Heartbeat,
        "worker-offline" => WorkerEventKind::Offline,
        _ => return Ok(None),
    };
    let hostname = event.get("hostname").and_then(Value::as_str).filter(|h| !h.is_empty());
    let hostname = hostname.ok_or(EventError::Field("hostname"))?.to_owned();
    let active = match (event.get("active").map(Value::as_u64), kind) {
        (Some(Some(n)), _) => u32::try_from(n).unwrap_or(u32::MAX),
        (None, WorkerEventKind::Offline) => 0,
        _ => return Err(EventError::Field("active")),
    };
    let processed = event.get("processed").and_then(Value::as_u64).unwrap_or(0);
    let freq = event
        .get("freq")
        .and_then(Value::as_f64)
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .filter(|freq| !freq.is_zero())
        .map_or(DEFAULT_FREQ, |freq| freq.clamp(MIN_FREQ, MAX_FREQ));
    Ok(Some(WorkerEvent { kind, hostname, active, processed, freq }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `worker-heartbeat` exactly as Celery 5.7 published it on Redis (db 3,
    /// `global_keyprefix: "pfx:"`, channel `pfx:/3.celeryev/worker.heartbeat`), two tasks running.
    const REDIS_HEARTBEAT: &str = r#"{"body": "eyJob3N0bmFtZSI6ICJwb29sQHBvZEEiLCAidXRjb2Zmc2V0IjogMC4wLCAicGlkIjogMTEwNjMsICJjbG9jayI6IDMsICJmcmVxIjogMi4wLCAiYWN0aXZlIjogMiwgInByb2Nlc3NlZCI6IDIsICJsb2FkYXZnIjogWzEuNCwgMC43NiwgMC4zMV0sICJzd19pZGVudCI6ICJweS1jZWxlcnkiLCAic3dfdmVyIjogIjUuNy4wIiwgInN3X3N5cyI6ICJMaW51eCIsICJ0aW1lc3RhbXAiOiAxNzk1MjQzOTgzLjk3NzcxMzgsICJ0eXBlIjogIndvcmtlci1oZWFydGJlYXQifQ==", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"hostname": "pool@podA"}, "properties": {"delivery_mode": 1, "delivery_info": {"exchange": "celeryev", "routing_key": "worker.heartbeat"}, "priority": 0, "body_encoding": "base64", "delivery_tag": "abafdfe7-9974-4764-8dd0-1d93c41b8297"}}"#;

    /// A `worker-offline` body as Celery 5.7 published it on RabbitMQ.
    const AMQP_OFFLINE: &str = r#"{"hostname": "pool@podR", "utcoffset": 0.0, "pid": 16167, "clock": 4, "freq": 2.0, "active": 0, "processed": 0, "loadavg": [2.04, 1.25, 0.56], "sw_ident": "py-celery", "sw_ver": "5.7.0", "sw_sys": "Linux", "timestamp": 1795244111.0, "type": "worker-offline"}"#;

    fn envelope(body: &str, content_type: &str) -> String {
        let encoded = BODY_BASE64.encode(body.as_bytes());
        serde_json::json!({
            "body": encoded,
            "content-encoding": "utf-8",
            "content-type": content_type,
            "headers": {},
            "properties": {"body_encoding": "base64"},
        })
        .to_string()
    }

    fn heartbeat(hostname: &str, active: u32, freq: f64) -> WorkerEvent {
        let body =
            serde_json::json!({"type": "worker-heartbeat", "hostname": hostname, "active": active, "freq": freq});
        parse_event_body(body.to_string().as_bytes(), Some("application/json")).unwrap().unwrap()
    }

    #[test]
    fn a_real_redis_heartbeat_parses() {
        let event = parse_redis_message(REDIS_HEARTBEAT.as_bytes()).unwrap().unwrap();
        assert_eq!(
            event,
            WorkerEvent {
                kind: WorkerEventKind::Heartbeat,
                hostname: "pool@podA".into(),
                active: 2,
                processed: 2,
                freq: Duration::from_secs(2),
            }
        );
    }

    #[test]
    fn online_and_offline_parse_from_both_brokers() {
        let offline = parse_event_body(AMQP_OFFLINE.as_bytes(), Some("application/json")).unwrap().unwrap();
        assert_eq!(
            (offline.kind, offline.hostname.as_str(), offline.active),
            (WorkerEventKind::Offline, "pool@podR", 0)
        );

        let online = r#"{"type": "worker-online", "hostname": "p@x", "active": 0, "processed": 7, "freq": 5.0}"#;
        let parsed = parse_redis_message(envelope(online, "application/json").as_bytes()).unwrap().unwrap();
        assert_eq!(parsed.kind, WorkerEventKind::Online);
        assert_eq!((parsed.processed, parsed.freq), (7, Duration::from_secs(5)));

        // An offline event without `active` still says the worker left.
        let bare = parse_event_body(br#"{"type": "worker-offline", "hostname": "p@x"}"#, None).unwrap().unwrap();
        assert_eq!((bare.kind, bare.active), (WorkerEventKind::Offline, 0));
        // A body without base64 encoding is taken as it is.
        let plain = serde_json::json!({"body": online, "content-type": "application/json", "properties": {}});
        assert!(parse_redis_message(plain.to_string().as_bytes()).unwrap().is_some());
    }

    #[test]
    fn other_event_types_are_ignored_not_errors() {
        for kind in ["task-succeeded", "task-received", "worker-custom"] {
            let body = format!(r#"{{"type": "{kind}", "hostname": "p@x", "uuid": "1"}}"#);
            assert_eq!(parse_event_body(body.as_bytes(), Some("application/json")), Ok(None), "{kind}");
        }
    }

    #[test]
    fn garbage_and_missing_fields_are_errors() {
        let cases: [(&[u8], Option<&str>, EventError); 9] = [
            (b"not json", None, EventError::NotJson),
            (b"[1, 2]", None, EventError::NotJson),
            (br#"{"hostname": "p@x", "active": 1}"#, None, EventError::Field("type")),
            (br#"{"type": "worker-heartbeat", "active": 1}"#, None, EventError::Field("hostname")),
            (br#"{"type": "worker-heartbeat", "hostname": "", "active": 1}"#, None, EventError::Field("hostname")),
            (br#"{"type": "worker-heartbeat", "hostname": "p@x"}"#, None, EventError::Field("active")),
            (br#"{"type": "worker-online", "hostname": "p@x", "active": -1}"#, None, EventError::Field("active")),
            (br#"{"type": "worker-heartbeat", "hostname": "p@x", "active": "2"}"#, None, EventError::Field("active")),
            (
                b"\x80\x04\x95",
                Some("application/x-python-serialize"),
                EventError::ContentType("application/x-python-serialize".into()),
            ),
        ];
        for (body, content_type, expected) in cases {
            assert_eq!(parse_event_body(body, content_type), Err(expected), "{}", String::from_utf8_lossy(body));
        }
        let bad_envelopes: [(&str, EventError); 4] = [
            ("garbage", EventError::NotJson),
            (r#"{"content-type": "application/json"}"#, EventError::Field("body")),
            (r#"{"body": "!!!", "properties": {"body_encoding": "base64"}}"#, EventError::Base64),
            (r#"{"body": "bm90IGpzb24=", "properties": {"body_encoding": "base64"}}"#, EventError::NotJson),
        ];
        for (payload, expected) in bad_envelopes {
            assert_eq!(parse_redis_message(payload.as_bytes()), Err(expected), "{payload}");
        }
    }

    #[test]
    fn no_truncation_or_corruption_of_a_real_message_panics() {
        let real = REDIS_HEARTBEAT.as_bytes();
        for end in 0..real.len() {
            let _ = parse_redis_message(&real[..end]);
        }
        for i in 0..real.len() {
            let mut corrupted = real.to_vec();
            corrupted[i] ^= 0x55;
            let _ = parse_redis_message(&corrupted);
        }
    }

    #[test]
    fn freq_is_clamped_and_defaulted_without_panicking() {
        let cases = [
            (2.0, Duration::from_secs(2)),
            (0.0, DEFAULT_FREQ),
            (-1.0, DEFAULT_FREQ),
            (1e300, DEFAULT_FREQ),
            (0.001, MIN_FREQ),
            (1e6, MAX_FREQ),
        ];
        for (freq, expected) in cases {
            assert_eq!(heartbeat("p@x", 0, freq).freq, expected, "{freq}");
        }
        let no_freq = parse_event_body(br#"{"type": "worker-heartbeat", "hostname": "p@x", "active": 0}"#, None);
        assert_eq!(no_freq.unwrap().unwrap().freq, DEFAULT_FREQ);
    }

    #[test]
    fn base64_bodies_decode_like_python_with_or_without_padding() {
        for text in ["", "f", "fo", "foo", "foob", "fooba", "foobar", "{\"a\": \u{e9}}"] {
            let encoded = base64::engine::general_purpose::STANDARD.encode(text.as_bytes());
            assert_eq!(BODY_BASE64.decode(&encoded).ok().as_deref(), Some(text.as_bytes()), "{encoded}");
            assert_eq!(BODY_BASE64.decode(encoded.trim_end_matches('=')).ok().as_deref(), Some(text.as_bytes()));
        }
        for garbage in ["Zm9v YmFy", "Zm9vY", "Zm9-"] {
            assert!(BODY_BASE64.decode(garbage).is_err(), "{garbage}");
        }
    }
}
