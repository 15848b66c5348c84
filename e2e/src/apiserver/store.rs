//! The in-memory "etcd": objects, one global resourceVersion counter, a bounded event history
//! (for watch resume and 410 Gone) and the open watches.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::mpsc;

use super::resources::{ResourceType, TypeKey};
use super::selector::{FieldSelector, LabelSelector};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// What a watch stream carries; the HTTP layer renders it for the requested version.
#[derive(Debug, Clone)]
pub enum Delivery {
    Event(EventType, Value),
    /// A BOOKMARK at this resourceVersion; `true` marks the end of `sendInitialEvents`.
    Bookmark(u64, bool),
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    key: TypeKey,
    kind: EventType,
    object: Value,
    old: Option<Value>,
}

/// The filter of one watch.
#[derive(Debug, Clone, Default)]
pub struct WatchFilter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl WatchFilter {
    pub fn matches(&self, obj: &Value) -> bool {
        let ns_ok = self
            .namespace
            .as_deref()
            .is_none_or(|ns| obj.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns));
        ns_ok && self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// The event a watcher with this filter sees for a change, if any (objects moving in or out
    /// of the selection appear as ADDED / DELETED, as on a real server).
    fn translate(&self, kind: EventType, object: &Value, old: Option<&Value>) -> Option<EventType> {
        let now = self.matches(object);
        match kind {
            EventType::Added | EventType::Deleted => now.then_some(kind),
            EventType::Modified => {
                let before = old.is_some_and(|o| self.matches(o));
                match (before, now) {
                    (true, true) => Some(EventType::Modified),
                    (false, true) => Some(EventType::Added),
                    (true, false) => Some(EventType::Deleted),
                    (false, false) => None,
                }
            }
        }
    }
}

struct Watcher {
    key: TypeKey,
    filter: WatchFilter,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Delivery>,
    /// A test's in-process observer ([`Store::observe`]), not a client's watch: `drop_watches`
    /// leaves it open and `open_watches` does not count it.
    observer: bool,
}

/// Why a watch could not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooOld {
    pub requested: u64,
    pub oldest: u64,
}

pub struct Store {
    rv: u64,
    pub types: BTreeMap<TypeKey, Arc<ResourceType>>,
    objects: HashMap<TypeKey, BTreeMap<(String, String), Value>>,
    history: VecDeque<Event>,
    history_limit: usize,
    /// Events with a resourceVersion at or below this are no longer retained.
    compacted: u64,
    watchers: Vec<Watcher>,
    /// The resourceVersion of the latest stored change, for in-process observers (the pod runner).
    changed: tokio::sync::watch::Sender<u64>,
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        Store {
            rv: 1,
            types: BTreeMap::new(),
            objects: HashMap::new(),
            history: VecDeque::new(),
            history_limit,
            compacted: 1,
            watchers: Vec::new(),
            changed: tokio::sync::watch::Sender::new(1),
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    pub fn get(&self, key: &TypeKey, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(key)?.get(&(ns.to_string(), name.to_string()))
    }

    /// Objects of one type in key order (namespace, name), optionally in one namespace.
    pub fn list<'a>(&'a self, key: &TypeKey, ns: Option<&'a str>) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects
            .get(key)
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(move |((ons, _), _)| ns.is_none_or(|n| n == ons))
            .map(|(_, v)| v)
    }

    /// Every object of every type (for garbage collection).
    pub fn all_objects(&self) -> impl Iterator<Item = (&TypeKey, &Value)> {
        self.objects.iter().flat_map(|(k, m)| m.values().map(move |v| (k, v)))
    }

    /// Store `obj` (which already carries its new resourceVersion) and notify watches.
    pub fn put(&mut self, key: &TypeKey, ns: &str, name: &str, obj: Value, rv: u64) {
        let old = self.objects.entry(key.clone()).or_default().insert((ns.to_string(), name.to_string()), obj.clone());
        let kind = if old.is_some() { EventType::Modified } else { EventType::Added };
        self.record(Event { rv, key: key.clone(), kind, object: obj, old });
    }

    /// Remove an object; `last` is its final state stamped with the deletion's resourceVersion.
    pub fn remove(&mut self, key: &TypeKey, ns: &str, name: &str, last: Value, rv: u64) {
        let removed = self.objects.get_mut(key).and_then(|m| m.remove(&(ns.to_string(), name.to_string())));
        if removed.is_some() {
            self.record(Event { rv, key: key.clone(), kind: EventType::Deleted, object: last, old: None });
        }
    }

    /// Drop every stored object of a type (when its CRD goes away), without events.
    pub fn drop_type(&mut self, key: &TypeKey) {
        self.objects.remove(key);
        self.watchers.retain(|w| w.key != *key);
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn record(&mut self, event: Event) {
        self.changed.send_replace(event.rv);
        self.watchers.retain(|w| {
            if w.key != event.key {
                return true;
            }
            match w.filter.translate(event.kind, &event.object, event.old.as_ref()) {
                Some(kind) => w.tx.send(Delivery::Event(kind, event.object.clone())).is_ok(),
                None => !w.tx.is_closed(),
            }
        });
        self.history.push_back(event);
        while self.history.len() > self.history_limit {
            if let Some(e) = self.history.pop_front() {
                self.compacted = e.rv;
            }
        }
    }

    /// Forget all retained history: any watch from an older resourceVersion gets 410 Gone.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    pub fn set_history_limit(&mut self, limit: usize) {
        self.history_limit = limit;
        while self.history.len() > self.history_limit {
            if let Some(e) = self.history.pop_front() {
                self.compacted = e.rv;
            }
        }
    }

    /// The oldest resourceVersion a watch or continue token can still start from.
    pub fn oldest_resumable(&self) -> u64 {
        self.compacted
    }

    /// Open a watch. `from` is the resourceVersion to resume after; `None` (or 0) starts with
    /// synthetic ADDED events for the current state. Returns the events to send first.
    pub fn watch(
        &mut self,
        key: &TypeKey,
        filter: WatchFilter,
        from: Option<u64>,
        bookmarks: bool,
        initial_events_bookmark: bool,
    ) -> Result<(Vec<Delivery>, mpsc::UnboundedReceiver<Delivery>), TooOld> {
        let mut initial = Vec::new();
        match from.filter(|rv| *rv > 0) {
            Some(rv) if rv < self.compacted => {
                return Err(TooOld { requested: rv, oldest: self.compacted });
            }
            Some(rv) => {
                for e in self.history.iter().filter(|e| e.rv > rv && e.key == *key) {
                    if let Some(kind) = filter.translate(e.kind, &e.object, e.old.as_ref()) {
                        initial.push(Delivery::Event(kind, e.object.clone()));
                    }
                }
            }
            None => {
                let ns = filter.namespace.clone();
                for obj in self.list(key, ns.as_deref()) {
                    if filter.matches(obj) {
                        initial.push(Delivery::Event(EventType::Added, obj.clone()));
                    }
                }
                if initial_events_bookmark {
                    initial.push(Delivery::Bookmark(self.rv, true));
                }
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.watchers.push(Watcher { key: key.clone(), filter, bookmarks, tx, observer: false });
        Ok((initial, rx))
    }

    /// Send a BOOKMARK at the current resourceVersion to every watch that asked for bookmarks.
    pub fn bookmark_all(&mut self) {
        let rv = self.rv;
        self.watchers.retain(|w| !w.bookmarks || w.tx.send(Delivery::Bookmark(rv, false)).is_ok());
    }

    /// Every change of one type from now on, in order, for an in-process observer.
    pub fn observe(&mut self, key: &TypeKey, filter: WatchFilter) -> mpsc::UnboundedReceiver<Delivery> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.watchers.push(Watcher { key: key.clone(), filter, bookmarks: false, tx, observer: true });
        rx
    }

    /// Close every open watch (clients see the stream end and must re-watch).
    pub fn drop_watches(&mut self) -> usize {
        let n = self.open_watches();
        self.watchers.retain(|w| w.observer);
        n
    }

    /// Close the open watches of one resource type (by plural name, any group).
    pub fn drop_watches_of(&mut self, plural: &str) -> usize {
        self.open_watches();
        let before = self.watchers.len();
        self.watchers.retain(|w| w.observer || w.key.plural != plural);
        before - self.watchers.len()
    }

    pub fn open_watches(&mut self) -> usize {
        self.watchers.retain(|w| !w.tx.is_closed());
        self.watchers.iter().filter(|w| !w.observer).count()
    }
}
