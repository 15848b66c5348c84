//! Reading Redis `INFO` sections into [`BrokerInfo`].

use std::collections::HashMap;

use crate::observation::{BrokerInfo, BrokerKind};

/// The `INFO` sections a probe asks for, each as its own command (multi-section `INFO` needs
/// Redis 7).
pub(crate) const SECTIONS: [&str; 4] = ["server", "memory", "persistence", "stats"];

/// `field:value` lines of any number of `INFO` replies.
fn fields<'a>(replies: impl IntoIterator<Item = &'a str>) -> HashMap<&'a str, &'a str> {
    replies
        .into_iter()
        .flat_map(str::lines)
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.trim_end().split_once(':'))
        .collect()
}

/// Broker facts from `INFO` replies; fields a reply lacks (a section was refused, an old server)
/// stay `None`.
pub(crate) fn broker_info<'a>(replies: impl IntoIterator<Item = &'a str>) -> BrokerInfo {
    let f = fields(replies);
    let number = |key: &str| f.get(key).and_then(|v| v.parse::<u64>().ok());
    let ok = |key: &str| f.get(key).map(|v| *v == "ok");
    let aof_enabled = f.get("aof_enabled").map(|v| *v == "1");
    let persistence_ok = match (ok("rdb_last_bgsave_status"), aof_enabled) {
        (Some(rdb), Some(true)) => Some(rdb && ok("aof_last_write_status").unwrap_or(true)),
        (rdb, _) => rdb,
    };
    BrokerInfo {
        version: f.get("redis_version").map(|v| (*v).to_owned()),
        eviction_policy: f.get("maxmemory_policy").map(|v| (*v).to_owned()),
        maxmemory_bytes: number("maxmemory"),
        used_memory_bytes: number("used_memory"),
        evicted_keys: number("evicted_keys"),
        aof_enabled,
        persistence_ok,
        ..BrokerInfo::new(BrokerKind::Redis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_sections_fill_the_broker_facts() {
        let memory = "# Memory\r\nused_memory:1048576\r\nused_memory_human:1.00M\r\n\
                      maxmemory:10485760\r\nmaxmemory_policy:allkeys-lru\r\n";
        let stats = "# Stats\r\nevicted_keys:42\r\nexpired_keys:0\r\n";
        let persistence = "# Persistence\r\naof_enabled:1\r\nrdb_last_bgsave_status:ok\r\n\
                           aof_last_write_status:err\r\n";
        let server = "# Server\r\nredis_version:7.0.15\r\n";
        let info = broker_info([server, memory, persistence, stats]);
        assert_eq!(info.version.as_deref(), Some("7.0.15"));
        assert_eq!(info.eviction_policy.as_deref(), Some("allkeys-lru"));
        assert_eq!(info.maxmemory_bytes, Some(10 << 20));
        assert_eq!(info.used_memory_bytes, Some(1 << 20));
        assert_eq!(info.evicted_keys, Some(42));
        assert_eq!(info.aof_enabled, Some(true));
        assert_eq!(info.persistence_ok, Some(false));
    }

    #[test]
    fn missing_sections_leave_fields_unknown() {
        let info = broker_info(["# Persistence\r\naof_enabled:0\r\nrdb_last_bgsave_status:ok\r\n"]);
        assert_eq!(info.eviction_policy, None);
        assert_eq!(info.maxmemory_bytes, None);
        assert_eq!(info.aof_enabled, Some(false));
        // The AOF status is irrelevant while AOF is off.
        assert_eq!(info.persistence_ok, Some(true));
    }
}
