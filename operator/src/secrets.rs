//! Secrets a TaskQueue references, read once per version.
//!
//! Only Secret *metadata* is watched ([`crate::cache::Stores`]): holding every Secret's data of a
//! namespace in memory would be a waste and a risk. So the TaskQueue reconciler (every status
//! interval) and the autoscaler (when it re-resolves a broker) used to GET each referenced Secret
//! again and again. [`SecretCache`] keeps the data of the Secrets that were read, keyed by their
//! resourceVersion: a read whose version the metadata watch still shows is answered from memory,
//! and a changed (rotated) Secret, or one the watch does not know, is read from the API server. A
//! steady fleet therefore sends no Secret GET at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};

use crate::api::{ApiError, Named};

/// A Secret read, by (namespace, name): the resourceVersion it was read at, and the Secret.
type Read = HashMap<(String, String), (String, Arc<Secret>)>;

/// The data of Secrets read, by namespace and name, with the resourceVersion they were read at.
#[derive(Default)]
pub struct SecretCache {
    versions: RwLock<Vec<Store<PartialObjectMeta<Secret>>>>,
    read: Mutex<Read>,
}

impl std::fmt::Debug for SecretCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the data.
        let n = self.read.lock().map(|r| r.len()).unwrap_or_default();
        f.debug_struct("SecretCache").field("secrets", &n).finish_non_exhaustive()
    }
}

impl SecretCache {
    /// Follows the Secret metadata watch of one scope (a namespace, or all).
    pub fn follow(&self, store: Store<PartialObjectMeta<Secret>>) {
        self.versions.write().expect("secret versions lock").push(store);
    }

    /// The resourceVersion the metadata watch shows for the Secret, if it knows it.
    fn version(&self, ns: &str, name: &str) -> Option<String> {
        let key = ObjectRef::new(name).within(ns);
        let stores = self.versions.read().expect("secret versions lock");
        stores.iter().find_map(|s| s.get(&key)).and_then(|m| m.metadata.resource_version.clone())
    }

    /// The Secret, from memory when the watch shows the version read last, else from the API.
    pub async fn get(&self, api: &Api<Secret>, ns: &str, name: &str) -> Result<Option<Arc<Secret>>, ApiError> {
        let key = (ns.to_string(), name.to_string());
        let watched = self.version(ns, name);
        if let Some(version) = &watched
            && let Some((read_at, secret)) = self.read.lock().expect("secret cache lock").get(&key)
            && read_at == version
        {
            return Ok(Some(secret.clone()));
        }
        let fetched = api.get_opt(name).await.named("GET", "Secret", format!("{ns}/{name}"))?;
        let known: Vec<(String, String)> = self.read.lock().expect("secret cache lock").keys().cloned().collect();
        let gone: Vec<(String, String)> = known.into_iter().filter(|(n, s)| self.version(n, s).is_none()).collect();
        let mut read = self.read.lock().expect("secret cache lock");
        // On a miss, also forget Secrets that no longer exist, so deleted ones leave nothing behind.
        for key in gone {
            read.remove(&key);
        }
        match fetched {
            None => {
                read.remove(&key);
                Ok(None)
            }
            Some(mut secret) => {
                // Keep only what is read: the data (annotations may hold it again, as kubectl's
                // last-applied-configuration).
                secret.metadata.annotations = None;
                secret.metadata.managed_fields = None;
                let secret = Arc::new(secret);
                if let Some(version) = secret.metadata.resource_version.clone() {
                    read.insert(key, (version, secret.clone()));
                }
                Ok(Some(secret))
            }
        }
    }
}
