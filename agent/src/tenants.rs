//! Tenant names and their stable numeric ids.
//!
//! Ids live in the pinned `BH_TENANT_IDS` map, next to the counters keyed by them: a restarted
//! agent finds the same ids, and a tenant added later gets a fresh id, never a retired one's.

use crate::datapath::Maps;
use agent_common::{MAX_TENANTS, TenantName, UNTAGGED_TENANT_ID, UNTAGGED_TENANT_NAME};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("tenant name {0:?} cannot be stored")]
    BadName(String),
    #[error(
        "no tenant id left for {0:?}: ids 1-{max} were all given out over the life of the pinned \
         maps; `bulkhead-agent cleanup --remove-maps` starts afresh (and loses the counters)",
        max = MAX_TENANTS - 1
    )]
    Exhausted(String),
    #[error("reading or writing the tenant id map: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// Which tenants may be tagged (the configured ones) and how every known id is labelled.
#[derive(Clone, Debug, Default)]
pub struct TenantRegistry {
    by_name: BTreeMap<String, u32>,
    /// Every id with a name, configured or retired (retired ones still label old counters).
    names: BTreeMap<u32, String>,
}

impl TenantRegistry {
    /// Builds the registry from the configured names and the ids already in `existing`,
    /// returning the new (name, id) pairs to persist.
    pub fn assign(
        configured: &[String],
        existing: &[(String, u32)],
    ) -> Result<(Self, Vec<(String, u32)>), TenantError> {
        let mut names: BTreeMap<u32, String> = existing
            .iter()
            .filter(|(_, id)| *id != UNTAGGED_TENANT_ID)
            .map(|(n, id)| (*id, n.clone()))
            .collect();
        let known: BTreeMap<&str, u32> = existing.iter().map(|(n, id)| (n.as_str(), *id)).collect();
        let mut next = names.keys().next_back().map_or(1, |m| m + 1);
        let mut by_name = BTreeMap::new();
        let mut new = Vec::new();
        for name in configured {
            let id = match known.get(name.as_str()) {
                Some(id) if *id != UNTAGGED_TENANT_ID => *id,
                _ => {
                    let id = next;
                    if id >= MAX_TENANTS {
                        return Err(TenantError::Exhausted(name.clone()));
                    }
                    next += 1;
                    names.insert(id, name.clone());
                    new.push((name.clone(), id));
                    id
                }
            };
            by_name.insert(name.clone(), id);
        }
        Ok((Self { by_name, names }, new))
    }

    /// Loads ids from the pinned map and stores ids for newly configured tenants.
    pub fn load(configured: &[String], maps: &Maps) -> Result<Self, TenantError> {
        let existing = maps.tenant_ids()?;
        let (registry, new) = Self::assign(configured, &existing)?;
        for (name, id) in new {
            let key = TenantName::new(&name).ok_or_else(|| TenantError::BadName(name.clone()))?;
            maps.insert_tenant_id(&key, id)?;
            tracing::info!(tenant = %name, id, "assigned tenant id");
        }
        Ok(registry)
    }

    /// The id of a configured tenant.
    pub fn id(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// The metric label of an id: its tenant's name, "untagged" for 0.
    pub fn label(&self, id: u32) -> String {
        if id == UNTAGGED_TENANT_ID {
            return UNTAGGED_TENANT_NAME.to_string();
        }
        self.names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("unknown-{id}"))
    }

    /// Name of a known id (configured or retired).
    pub fn name(&self, id: u32) -> Option<&str> {
        self.names.get(&id).map(String::as_str)
    }

    /// Every id that labels counters: 0 ("untagged") and each named id, configured or retired.
    pub fn labelled_ids(&self) -> Vec<(u32, String)> {
        let mut v = vec![(UNTAGGED_TENANT_ID, UNTAGGED_TENANT_NAME.to_string())];
        v.extend(self.names.iter().map(|(id, n)| (*id, n.clone())));
        v
    }

    pub fn configured(&self) -> impl Iterator<Item = (&str, u32)> {
        self.by_name.iter().map(|(n, id)| (n.as_str(), *id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ids_are_stable_and_never_reused() {
        let (r, new) = TenantRegistry::assign(&names(&["a", "b"]), &[]).unwrap();
        assert_eq!(new, vec![("a".into(), 1), ("b".into(), 2)]);
        assert_eq!(r.id("a"), Some(1));
        // Restart with b removed and c added: a keeps 1, c gets 3 (not b's 2).
        let existing = vec![("a".to_string(), 1), ("b".to_string(), 2)];
        let (r, new) = TenantRegistry::assign(&names(&["c", "a"]), &existing).unwrap();
        assert_eq!(new, vec![("c".into(), 3)]);
        assert_eq!(r.id("a"), Some(1));
        assert_eq!(r.id("c"), Some(3));
        assert_eq!(r.id("b"), None, "a retired tenant cannot be tagged");
        assert_eq!(r.label(2), "b", "but its old counters keep their label");
        assert_eq!(r.label(0), "untagged");
        assert_eq!(r.label(99), "unknown-99");
        assert_eq!(
            r.labelled_ids(),
            vec![
                (0, "untagged".into()),
                (1, "a".into()),
                (2, "b".into()),
                (3, "c".into())
            ]
        );
    }

    #[test]
    fn running_out_of_ids_is_a_clear_error() {
        let existing = vec![("old".to_string(), MAX_TENANTS - 1)];
        let err = TenantRegistry::assign(&names(&["new"]), &existing).unwrap_err();
        assert!(
            err.to_string().contains("no tenant id left for \"new\""),
            "{err}"
        );
    }
}
