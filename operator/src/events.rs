//! Publishes Kubernetes Events (`events.k8s.io/v1`) as kube's `Recorder` does — the same Event
//! objects, and the same series: an Event published again within [`CACHE_TTL`] of the last one
//! with the same key (type, action, reason, reporter, regarding and related object) is patched
//! into a series instead of created anew — with a compact cache.
//!
//! kube's recorder keeps each Event it published for six minutes as the whole `Event` object in a
//! map keyed by a struct of owned strings: about 3 KiB per entry. A fleet's start-up publishes a
//! few Events per object (and every status write makes the next Event's key new, as the key holds
//! the object's resourceVersion), so at 1,000 pools the cache held ~20 MiB for the six minutes
//! after start-up. This one keeps the key as one string and, per entry, only what the series
//! patch needs: the Event's name and namespace, its count, and when it was last seen.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
pub use kube::runtime::events::{Event, EventType, Reporter};

/// How long a published Event can still become a series (kube's recorder uses the same).
pub const CACHE_TTL: SignedDuration = SignedDuration::from_mins(6);
/// How often expired entries are dropped from the cache.
const PRUNE_INTERVAL: SignedDuration = SignedDuration::from_secs(10);

/// What the cache keeps of a published Event.
struct Published {
    name: String,
    namespace: String,
    /// `series.count` of the last publish (1 before it became a series).
    count: i32,
    /// When it was last published.
    last: Timestamp,
}

/// Publishes Events for any object. Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    reporter: Reporter,
    cache: std::sync::Arc<Mutex<Cache>>,
}

/// Published Events by key, and when expired ones were last dropped.
struct Cache {
    entries: HashMap<String, Published>,
    pruned: Timestamp,
}

impl Default for Cache {
    fn default() -> Self {
        Self { entries: HashMap::new(), pruned: Timestamp::UNIX_EPOCH }
    }
}

impl Recorder {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self { client, reporter, cache: Default::default() }
    }

    /// The cache key: every field kube's recorder compares, `\0`-separated (no field holds a NUL).
    fn key(&self, ev: &Event, regarding: &ObjectReference) -> String {
        fn reference(out: &mut String, r: &ObjectReference) {
            for field in [&r.api_version, &r.kind, &r.name, &r.namespace, &r.uid, &r.resource_version, &r.field_path] {
                out.push_str(field.as_deref().unwrap_or("\u{1}"));
                out.push('\0');
            }
        }
        let mut key = String::with_capacity(160);
        key.push_str(match ev.type_ {
            EventType::Normal => "N\0",
            EventType::Warning => "W\0",
        });
        for field in [&ev.action, &ev.reason, &self.reporter.controller] {
            key.push_str(field);
            key.push('\0');
        }
        key.push_str(self.reporter.instance.as_deref().unwrap_or("\u{1}"));
        key.push('\0');
        reference(&mut key, regarding);
        if let Some(related) = &ev.secondary {
            reference(&mut key, related);
        }
        key
    }

    /// The Event kube's recorder would create for `ev` at `now`.
    fn generate(&self, ev: &Event, reference: &ObjectReference, now: Timestamp) -> K8sEvent {
        K8sEvent {
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            event_time: Some(MicroTime(now)),
            regarding: Some(reference.clone()),
            note: ev.note.clone(),
            metadata: ObjectMeta {
                namespace: reference.namespace.clone(),
                name: Some(format!(
                    "{}.{:x}",
                    reference.name.as_ref().unwrap_or(&self.reporter.controller),
                    now.as_nanosecond()
                )),
                ..Default::default()
            },
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter.instance.clone().unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            series: None,
            type_: Some(match ev.type_ {
                EventType::Normal => "Normal".into(),
                EventType::Warning => "Warning".into(),
            }),
            related: ev.secondary.clone(),
            ..Default::default()
        }
    }

    /// Publishes `ev` about `reference`: creates an Event, or patches the series of the one
    /// published with the same key within [`CACHE_TTL`].
    pub async fn publish(&self, ev: &Event, reference: &ObjectReference) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = self.key(ev, reference);
        let earlier = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            // Expired entries are dropped at most every PRUNE_INTERVAL (kube's recorder walked the
            // whole cache on every publish: quadratic in a start-up's Events); until then one is
            // simply not used.
            if cache.pruned + PRUNE_INTERVAL <= now {
                cache.entries.retain(|_, p| p.last + CACHE_TTL > now);
                cache.pruned = now;
            }
            cache
                .entries
                .get(&key)
                .filter(|p| p.last + CACHE_TTL > now)
                .map(|p| (p.name.clone(), p.namespace.clone(), p.count))
        };
        let published = match earlier {
            Some((name, namespace, count)) => {
                let count = count + 1;
                let series = EventSeries { count, last_observed_time: MicroTime(now) };
                // A merge patch of the series alone leaves the Event as kube's recorder leaves it
                // (it sends the whole cached Event, whose other fields are unchanged).
                let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
                let patch = serde_json::json!({ "series": series });
                events.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
                Published { name, namespace, count, last: now }
            }
            None => {
                let event = self.generate(ev, reference, now);
                let namespace = reference.namespace.clone().unwrap_or_else(|| "default".to_string());
                let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
                events.create(&PostParams::default(), &event).await?;
                let name = event.metadata.name.unwrap_or_default();
                Published { name, namespace, count: 1, last: now }
            }
        };
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).entries.insert(key, published);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(rv: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("celery-operator.dev/v1alpha1".into()),
            kind: Some("WorkerPool".into()),
            name: Some("mail".into()),
            namespace: Some("prod".into()),
            uid: Some("u-1".into()),
            resource_version: Some(rv.into()),
            field_path: None,
        }
    }

    fn event(reason: &str) -> Event {
        Event { type_: EventType::Normal, reason: reason.into(), note: None, action: "Scale".into(), secondary: None }
    }

    #[tokio::test]
    async fn the_key_tells_apart_what_kubes_recorder_tells_apart() {
        let client = Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
        let r = Recorder::new(client, Reporter { controller: "celery-operator".into(), instance: None });
        let same = r.key(&event("ScaledUp"), &reference("1"));
        assert_eq!(same, r.key(&event("ScaledUp"), &reference("1")));
        assert_ne!(same, r.key(&event("ScaledDown"), &reference("1")), "reason");
        assert_ne!(same, r.key(&event("ScaledUp"), &reference("2")), "resourceVersion");
        let mut note = event("ScaledUp");
        note.note = Some("another note".into());
        assert_eq!(same, r.key(&note, &reference("1")), "the note is not part of the key");
        let mut warning = event("ScaledUp");
        warning.type_ = EventType::Warning;
        assert_ne!(same, r.key(&warning, &reference("1")), "type");
    }
}
