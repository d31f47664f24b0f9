//! The namespace controller: a terminating namespace's contents are deleted through the API
//! (every namespaced kind discovery lists, so custom ones too), its status conditions say what
//! is left (`kinds::namespace`), and once nothing is, its `kubernetes` finalizer is removed
//! through `namespaces/NAME/finalize`, which lets the API server delete it.

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Discovery,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
    discovery::{Scope, verbs},
};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::{
    control::{
        Caches,
        runner::{self, Controller, PassError},
    },
    kinds::namespace::{KUBERNETES, Remaining, conditions, merge_conditions},
};

pub async fn run(client: Client, caches: Caches, leading: watch::Receiver<bool>) {
    let c = Namespaces {
        client,
        caches: caches.clone(),
    };
    runner::run(c, &caches, leading).await;
}

struct Namespaces {
    client: Client,
    caches: Caches,
}

impl Controller for Namespaces {
    fn name(&self) -> &'static str {
        "namespace-controller"
    }

    fn signals(&self, caches: &Caches) -> Vec<watch::Receiver<u64>> {
        vec![caches.namespaces.changed.clone()]
    }

    /// Finalizers on the contents go away without an event on the namespace.
    fn period(&self) -> Duration {
        Duration::from_secs(2)
    }

    async fn pass(&mut self) -> Result<(), PassError> {
        let terminating: Vec<_> = self
            .caches
            .namespaces
            .all()
            .into_iter()
            .filter(|ns| {
                ns.metadata.deletion_timestamp.is_some()
                    && ns
                        .spec
                        .as_ref()
                        .and_then(|s| s.finalizers.as_ref())
                        .is_some_and(|f| f.iter().any(|x| x == KUBERNETES))
            })
            .collect();
        if terminating.is_empty() {
            return Ok(());
        }
        let discovery = Discovery::new(self.client.clone()).run().await?;
        for ns in terminating {
            let name = ns.metadata.name.clone().unwrap_or_default();
            if let Err(e) = self.sweep(&discovery, &ns, &name).await {
                tracing::warn!(namespace = %name, error = %e, "deleting the namespace's content");
            }
        }
        Ok(())
    }
}

impl Namespaces {
    /// Deletes what is in `name`, records what is left, and finalizes it once empty.
    async fn sweep(&self, discovery: &Discovery, ns: &Namespace, name: &str) -> kube::Result<()> {
        let mut remaining = vec![];
        for group in discovery.groups() {
            for (ar, caps) in group.recommended_resources() {
                if caps.scope != Scope::Namespaced
                    || !caps.supports_operation(verbs::LIST)
                    || !caps.supports_operation(verbs::DELETE)
                {
                    continue;
                }
                let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), name, &ar);
                let list = api.list(&ListParams::default()).await?;
                let mut left = Remaining {
                    resource: ar.plural.clone(),
                    group: ar.group.clone(),
                    ..Default::default()
                };
                for o in &list.items {
                    left.count += 1;
                    for f in o.metadata.finalizers.iter().flatten() {
                        *left.finalizers.entry(f.clone()).or_default() += 1;
                    }
                    let Some(obj) = o.metadata.name.as_deref() else {
                        continue;
                    };
                    if o.metadata.deletion_timestamp.is_none() {
                        match api.delete(obj, &DeleteParams::background()).await {
                            Ok(_) => {}
                            Err(kube::Error::Api(e)) if e.code == 404 => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                if left.count > 0 {
                    remaining.push(left);
                }
            }
        }
        let api: Api<Namespace> = Api::all(self.client.clone());
        let old: Vec<Value> = ns
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .map(|c| {
                c.iter()
                    .filter_map(|x| serde_json::to_value(x).ok())
                    .collect()
            })
            .unwrap_or_default();
        let now = jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        if let Some(conds) = merge_conditions(&old, conditions(&remaining), &now) {
            let patch = json!({"status": {"conditions": conds}});
            api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        if !remaining.is_empty() {
            return Ok(());
        }
        // Empty: our finalizer goes (others, if any, are their owners' to remove).
        let mut done = ns.clone();
        if let Some(f) = done.spec.as_mut().and_then(|s| s.finalizers.as_mut()) {
            f.retain(|x| x != KUBERNETES);
        }
        match api
            .replace_subresource("finalize", name, &PostParams::default(), &done)
            .await
        {
            Ok(_) => {}
            // Changed meanwhile (a status write): the next pass finalizes.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }
}
