//! The request log tests read, and the fault injection rules that match against the same fields.

use std::time::Duration;

/// The Kubernetes verb of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
}

impl Verb {
    /// Whether the verb can change stored state.
    pub fn is_write(self) -> bool {
        matches!(self, Verb::Create | Verb::Update | Verb::Patch | Verb::Delete | Verb::DeleteCollection)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
        }
    }
}

/// One resource request as the double saw it. Bodies are never recorded (they may hold secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub verb: Verb,
    pub group: String,
    pub version: String,
    /// Plural resource name, e.g. `deployments`.
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub field_manager: Option<String>,
    pub dry_run: bool,
    /// HTTP status code of the response (200 for watches that started).
    pub status: u16,
    /// Whether an injected fault produced the response.
    pub injected: bool,
}

impl RequestRecord {
    /// A write that reached the store's write path and succeeded (not dry-run, not a fault).
    pub fn is_successful_write(&self) -> bool {
        self.verb.is_write() && !self.dry_run && (200..300).contains(&self.status)
    }
}

/// Which requests a fault applies to; every set field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestMatch {
    pub verbs: Vec<Verb>,
    pub group: Option<String>,
    pub resource: Option<String>,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub field_manager: Option<String>,
}

impl RequestMatch {
    /// Every resource request.
    pub fn any() -> Self {
        Self::default()
    }

    /// Only create, update, patch, delete and deletecollection.
    pub fn writes() -> Self {
        Self::default().verbs(&[Verb::Create, Verb::Update, Verb::Patch, Verb::Delete, Verb::DeleteCollection])
    }

    pub fn verbs(mut self, verbs: &[Verb]) -> Self {
        self.verbs = verbs.to_vec();
        self
    }

    pub fn verb(self, verb: Verb) -> Self {
        self.verbs(&[verb])
    }

    pub fn group(mut self, group: &str) -> Self {
        self.group = Some(group.to_string());
        self
    }

    pub fn resource(mut self, resource: &str) -> Self {
        self.resource = Some(resource.to_string());
        self
    }

    pub fn subresource(mut self, subresource: &str) -> Self {
        self.subresource = Some(subresource.to_string());
        self
    }

    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_string());
        self
    }

    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    pub fn field_manager(mut self, manager: &str) -> Self {
        self.field_manager = Some(manager.to_string());
        self
    }

    pub fn matches(&self, r: &RequestRecord) -> bool {
        fn opt(want: &Option<String>, have: Option<&str>) -> bool {
            want.as_deref().is_none_or(|w| Some(w) == have)
        }
        (self.verbs.is_empty() || self.verbs.contains(&r.verb))
            && opt(&self.group, Some(&r.group))
            && opt(&self.resource, Some(&r.resource))
            && opt(&self.subresource, r.subresource.as_deref())
            && opt(&self.namespace, r.namespace.as_deref())
            && opt(&self.name, r.name.as_deref())
            && opt(&self.field_manager, r.field_manager.as_deref())
    }
}

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultEffect {
    /// Answer with this HTTP status (500, 503, 429 with Retry-After, 409, 504...) without running the request.
    Error(u16),
    /// Delay the request, then run it normally.
    Latency(Duration),
}

/// A fault injection rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub matcher: RequestMatch,
    pub effect: FaultEffect,
    /// How many more matching requests it applies to (`None`: unlimited).
    pub remaining: Option<usize>,
    /// Fraction of matching requests affected, 0.0..=1.0.
    pub probability: f64,
}

impl Fault {
    /// Fail matching requests with `code` (every one, until limited with [`Fault::times`] or
    /// [`Fault::with_probability`]).
    pub fn error(code: u16) -> Self {
        Fault { matcher: RequestMatch::any(), effect: FaultEffect::Error(code), remaining: None, probability: 1.0 }
    }

    /// Delay matching requests.
    pub fn latency(delay: Duration) -> Self {
        Fault { matcher: RequestMatch::any(), effect: FaultEffect::Latency(delay), remaining: None, probability: 1.0 }
    }

    pub fn on(mut self, matcher: RequestMatch) -> Self {
        self.matcher = matcher;
        self
    }

    /// Apply to the next `n` matching requests only.
    pub fn times(mut self, n: usize) -> Self {
        self.remaining = Some(n);
        self
    }

    pub fn with_probability(mut self, p: f64) -> Self {
        self.probability = p.clamp(0.0, 1.0);
        self
    }
}

/// The active fault rules and the seeded random source for probabilistic ones.
#[derive(Debug)]
pub struct Faults {
    rules: Vec<Fault>,
    rng: fastrand::Rng,
}

impl Default for Faults {
    fn default() -> Self {
        Faults { rules: Vec::new(), rng: fastrand::Rng::with_seed(0x5eed) }
    }
}

impl Faults {
    pub fn add(&mut self, fault: Fault) {
        self.rules.push(fault);
    }

    pub fn clear(&mut self) {
        self.rules.clear();
    }

    pub fn reseed(&mut self, seed: u64) {
        self.rng = fastrand::Rng::with_seed(seed);
    }

    /// The effects that apply to this request (latency first), consuming counted rules.
    pub fn effects_for(&mut self, r: &RequestRecord) -> Vec<FaultEffect> {
        let mut effects = Vec::new();
        for rule in self.rules.iter_mut() {
            if rule.remaining == Some(0) || !rule.matcher.matches(r) {
                continue;
            }
            if rule.probability < 1.0 && self.rng.f64() >= rule.probability {
                continue;
            }
            if let Some(n) = rule.remaining.as_mut() {
                *n -= 1;
            }
            effects.push(rule.effect);
        }
        self.rules.retain(|r| r.remaining != Some(0));
        effects.sort_by_key(|e| matches!(e, FaultEffect::Error(_)));
        effects
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(verb: Verb, resource: &str) -> RequestRecord {
        RequestRecord {
            verb,
            group: "apps".into(),
            version: "v1".into(),
            resource: resource.into(),
            subresource: None,
            namespace: Some("default".into()),
            name: Some("x".into()),
            field_manager: None,
            dry_run: false,
            status: 200,
            injected: false,
        }
    }

    #[test]
    fn counted_faults_expire_after_n_matches() {
        let mut faults = Faults::default();
        faults.add(Fault::error(500).on(RequestMatch::writes().resource("deployments")).times(2));
        assert!(faults.effects_for(&record(Verb::Get, "deployments")).is_empty());
        assert_eq!(faults.effects_for(&record(Verb::Patch, "deployments")), vec![FaultEffect::Error(500)]);
        assert_eq!(faults.effects_for(&record(Verb::Create, "deployments")), vec![FaultEffect::Error(500)]);
        assert!(faults.effects_for(&record(Verb::Patch, "deployments")).is_empty());
    }

    #[test]
    fn probabilistic_faults_hit_roughly_their_fraction() {
        let mut faults = Faults::default();
        faults.add(Fault::error(503).with_probability(0.25));
        let hits = (0..4000).filter(|_| !faults.effects_for(&record(Verb::Get, "pods")).is_empty()).count();
        assert!((800..1200).contains(&hits), "{hits}");
    }
}
