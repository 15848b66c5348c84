//! Small metadata helpers: timestamps, uids, generated names, name validation.

use serde_json::Value;

/// RFC 3339 UTC with second precision, as `metav1.Time` serializes.
pub fn now() -> String {
    let ts = k8s_openapi::jiff::Timestamp::now();
    ts.round(k8s_openapi::jiff::Unit::Second).unwrap_or(ts).to_string()
}

/// Parse a `metav1.Time` into Unix seconds.
pub fn parse_time(s: &str) -> Option<i64> {
    s.parse::<k8s_openapi::jiff::Timestamp>().ok().map(|t| t.as_second())
}

pub fn now_seconds() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_second()
}

/// A random version-4 UUID string.
pub fn new_uid() -> String {
    let mut bytes = fastrand::u128(..).to_be_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// `generateName` suffix: 5 characters from the same alphabet the real server uses.
pub fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5).map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char).collect()
}

/// DNS-1123 subdomain check (the rule for most object names). Returns the error message.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && label.as_bytes()[0].is_ascii_alphanumeric()
                && label.as_bytes()[label.len() - 1].is_ascii_alphanumeric()
        });
    if ok {
        Ok(())
    } else {
        Err("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')".to_string())
    }
}

pub fn name_of(obj: &Value) -> &str {
    obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default()
}

pub fn namespace_of(obj: &Value) -> &str {
    obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default()
}

pub fn uid_of(obj: &Value) -> &str {
    obj.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default()
}

pub fn rv_of(obj: &Value) -> &str {
    obj.pointer("/metadata/resourceVersion").and_then(Value::as_str).unwrap_or_default()
}

/// `metadata` as a mutable map, created if missing.
pub fn metadata_mut(obj: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = Value::Object(Default::default());
    }
    obj["metadata"].as_object_mut().expect("metadata is an object")
}

/// Human-readable age as kubectl prints it (`k8s.io/apimachinery/pkg/util/duration.HumanDuration`).
pub fn human_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    if s < 120 {
        return format!("{s}s");
    }
    let m = s / 60;
    if m < 10 {
        let rs = s % 60;
        return if rs == 0 { format!("{m}m") } else { format!("{m}m{rs}s") };
    }
    if m < 180 {
        return format!("{m}m");
    }
    let h = s / 3600;
    if h < 8 {
        let rm = (s % 3600) / 60;
        return if rm == 0 { format!("{h}h") } else { format!("{h}h{rm}m") };
    }
    if h < 48 {
        return format!("{h}h");
    }
    if h < 192 {
        let d = h / 24;
        let rh = h % 24;
        return if rh == 0 { format!("{d}d") } else { format!("{d}d{rh}h") };
    }
    let d = h / 24;
    if d < 365 * 2 {
        return format!("{d}d");
    }
    let y = d / 365;
    if y < 8 {
        let rd = d % 365;
        return if rd == 0 { format!("{y}y") } else { format!("{y}y{rd}d") };
    }
    format!("{y}y")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_version_4() {
        let uid = new_uid();
        assert_eq!(uid.len(), 36);
        assert_eq!(&uid[14..15], "4");
    }

    #[test]
    fn names_follow_dns_1123_subdomains() {
        assert!(validate_name("mail-worker.v1").is_ok());
        assert!(validate_name("Mail").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("").is_err());
    }

    #[test]
    fn durations_print_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(3600 * 3), "3h");
        assert_eq!(human_duration(86400 * 3 + 3600), "3d1h");
    }

    #[test]
    fn timestamps_round_trip() {
        let t = now();
        assert!(t.ends_with('Z') && !t.contains('.'), "{t}");
        assert!(parse_time(&t).is_some());
    }
}
