//! In-cluster scaling (`coordinator --fleet kubernetes --statefulset NAME`): `shardctl scale`
//! changes the replicas of the worker StatefulSet through its `scale` subresource.
//!
//! A StatefulSet's pods are NAME-0 … NAME-(n-1), and each worker registers under its pod name
//! (`SHARDSERVE_WORKER_ID` from `metadata.name`), so the pods that scaling down removes — the
//! highest ordinals — are known before the patch, and are drained first: no request in flight
//! fails. Scaling up patches the replicas and waits until the new pods have registered.
//!
//! RBAC: the coordinator's ServiceAccount needs `get` and `patch` on `statefulsets/scale` in
//! its namespace (deploy/kubernetes/ grants exactly that).

use crate::error::ServeError;
use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, Patch, PatchParams};
use tracing::info;

/// The worker StatefulSet this coordinator scales.
#[derive(Clone)]
pub struct StatefulSetScaler {
    api: Api<StatefulSet>,
    name: String,
    namespace: String,
}

impl std::fmt::Debug for StatefulSetScaler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StatefulSet {}/{}", self.namespace, self.name)
    }
}

impl StatefulSetScaler {
    /// Through the in-cluster configuration (the pod's ServiceAccount token and CA); the
    /// namespace defaults to the pod's own.
    pub fn in_cluster(name: String, namespace: Option<String>) -> anyhow::Result<Self> {
        let config = kube::Config::incluster()
            .map_err(|e| anyhow::anyhow!("--fleet kubernetes needs to run in a Kubernetes pod (in-cluster configuration): {e}"))?;
        let namespace = namespace.unwrap_or_else(|| config.default_namespace.clone());
        let client = kube::Client::try_from(config).map_err(|e| anyhow::anyhow!("Kubernetes client: {e}"))?;
        Ok(Self::new(client, &namespace, name))
    }

    /// Through `client`, on `namespace`/`name`.
    pub fn new(client: kube::Client, namespace: &str, name: String) -> Self {
        Self { api: Api::namespaced(client, namespace), name, namespace: namespace.to_string() }
    }

    /// The replicas the StatefulSet asks for now.
    pub async fn replicas(&self) -> Result<u32, ServeError> {
        let scale = self.api.get_scale(&self.name).await.map_err(|e| api_error("reading the scale of", &self.name, e))?;
        Ok(scale.spec.and_then(|s| s.replicas).unwrap_or(0).max(0) as u32)
    }

    /// Sets the replicas (a merge patch of the scale subresource).
    pub async fn set_replicas(&self, replicas: u32) -> Result<(), ServeError> {
        let patch = serde_json::json!({ "spec": { "replicas": replicas } });
        self.api
            .patch_scale(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| api_error("scaling", &self.name, e))?;
        Ok(())
    }
}

/// The pods scaling `name` from `current` to `target` replicas adds and removes; the removed
/// ones highest ordinal first, the order the StatefulSet controller deletes them in.
pub fn plan(name: &str, current: u32, target: u32) -> (Vec<String>, Vec<String>) {
    let pod = |i: u32| format!("{name}-{i}");
    if target >= current {
        ((current..target).map(pod).collect(), Vec::new())
    } else {
        (Vec::new(), (target..current).rev().map(pod).collect())
    }
}

/// Scales to `target` workers: drains each pod that will go (`drain`, highest ordinal first),
/// patches the replicas, then `settle`s (waits until the added pods registered and the removed
/// ones left). Returns (added, removed) worker ids.
pub async fn scale(
    set: &StatefulSetScaler,
    target: u32,
    mut drain: impl FnMut(String) -> BoxFuture<'static, Result<(), ServeError>>,
    settle: impl FnOnce(Vec<String>, Vec<String>) -> BoxFuture<'static, Result<(), ServeError>>,
) -> Result<(Vec<String>, Vec<String>), ServeError> {
    if target == 0 {
        return Err(ServeError::InvalidArgument("workers must be at least 1".into()));
    }
    let current = set.replicas().await?;
    let (added, removed) = plan(&set.name, current, target);
    for id in &removed {
        drain(id.clone()).await?;
    }
    if current != target {
        set.set_replicas(target).await?;
        info!(statefulset = %set.name, from = current, to = target, "scaled the worker StatefulSet");
    }
    settle(added.clone(), removed.clone()).await?;
    Ok((added, removed))
}

fn api_error(what: &str, name: &str, e: kube::Error) -> ServeError {
    let (code, message) = match &e {
        kube::Error::Api(s) => (s.code, s.message.clone()),
        other => (0, other.to_string()),
    };
    ServeError::Kubernetes { what: format!("{what} StatefulSet {name}"), code, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response};
    use kube::client::Body;
    use std::sync::{Arc, Mutex};

    #[test]
    fn scaling_down_removes_the_highest_ordinals_first() {
        assert_eq!(plan("w", 2, 4), (vec!["w-2".to_string(), "w-3".to_string()], vec![]));
        assert_eq!(plan("w", 5, 2), (vec![], vec!["w-4".to_string(), "w-3".to_string(), "w-2".to_string()]));
        assert_eq!(plan("w", 3, 3), (vec![], vec![]));
    }

    fn scale_json(replicas: u32) -> String {
        serde_json::json!({
            "kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": { "name": "shardserve-worker", "namespace": "serving" },
            "spec": { "replicas": replicas }, "status": { "replicas": replicas }
        })
        .to_string()
    }

    /// An API server that answers the scale subresource of `serving/shardserve-worker` from
    /// `replicas`, logging each request (method, path, body) into `log`.
    fn mock(replicas: u32, log: Arc<Mutex<Vec<String>>>, forbid_patch: bool) -> StatefulSetScaler {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            let mut replicas = replicas;
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let body = String::from_utf8(body.collect_bytes().await.unwrap().to_vec()).unwrap();
                let ctype = parts.headers.get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
                log.lock().unwrap().push(format!("{} {} {ctype} {body}", parts.method, parts.uri.path()).trim_end().to_string());
                assert_eq!(parts.uri.path(), "/apis/apps/v1/namespaces/serving/statefulsets/shardserve-worker/scale");
                let response = match parts.method {
                    Method::GET => Response::builder().status(200).body(Body::from(scale_json(replicas).into_bytes())),
                    Method::PATCH if forbid_patch => Response::builder().status(403).body(Body::from(
                        serde_json::json!({
                            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
                            "message": "statefulsets.apps \"shardserve-worker\" is forbidden: User \"system:serviceaccount:serving:default\" cannot patch resource \"statefulsets/scale\""
                        })
                        .to_string()
                        .into_bytes(),
                    )),
                    Method::PATCH => {
                        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                        replicas = v["spec"]["replicas"].as_u64().unwrap() as u32;
                        Response::builder().status(200).body(Body::from(scale_json(replicas).into_bytes()))
                    }
                    m => panic!("unexpected {m}"),
                };
                send.send_response(response.unwrap());
            }
        });
        StatefulSetScaler::new(kube::Client::new(service, "serving"), "serving", "shardserve-worker".into())
    }

    type Log = Arc<Mutex<Vec<String>>>;

    fn drainer(log: Log) -> impl FnMut(String) -> BoxFuture<'static, Result<(), ServeError>> {
        move |id| {
            let log = log.clone();
            Box::pin(async move {
                log.lock().unwrap().push(format!("drain {id}"));
                Ok(())
            })
        }
    }

    fn settler(log: Log) -> impl FnOnce(Vec<String>, Vec<String>) -> BoxFuture<'static, Result<(), ServeError>> {
        move |added, removed| {
            Box::pin(async move {
                log.lock().unwrap().push(format!("settle +{added:?} -{removed:?}"));
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn scaling_down_drains_the_highest_ordinals_then_patches_the_scale_subresource() {
        let log = Log::default();
        let set = mock(4, log.clone(), false);
        let (added, removed) = scale(&set, 2, drainer(log.clone()), settler(log.clone())).await.unwrap();
        assert!(added.is_empty());
        assert_eq!(removed, ["shardserve-worker-3", "shardserve-worker-2"]);
        let path = "/apis/apps/v1/namespaces/serving/statefulsets/shardserve-worker/scale";
        assert_eq!(
            *log.lock().unwrap(),
            [
                format!("GET {path}"),
                "drain shardserve-worker-3".to_string(),
                "drain shardserve-worker-2".to_string(),
                format!("PATCH {path} application/merge-patch+json {{\"spec\":{{\"replicas\":2}}}}"),
                "settle +[] -[\"shardserve-worker-3\", \"shardserve-worker-2\"]".to_string(),
            ]
        );
    }

    #[tokio::test]
    async fn scaling_up_patches_the_replicas_then_waits_for_the_new_pods() {
        let log = Log::default();
        let set = mock(2, log.clone(), false);
        let (added, removed) = scale(&set, 3, drainer(log.clone()), settler(log.clone())).await.unwrap();
        assert_eq!(added, ["shardserve-worker-2"]);
        assert!(removed.is_empty());
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 3, "{log:?}");
        assert!(log[0].starts_with("GET "));
        assert!(log[1].ends_with("application/merge-patch+json {\"spec\":{\"replicas\":3}}"), "{}", log[1]);
        assert_eq!(log[2], "settle +[\"shardserve-worker-2\"] -[]");
    }

    #[tokio::test]
    async fn a_patch_the_role_does_not_allow_is_permission_denied_naming_the_statefulset() {
        let log = Log::default();
        let set = mock(2, log.clone(), true);
        let err = scale(&set, 3, drainer(log.clone()), settler(log.clone())).await.unwrap_err();
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(status.message().contains("scaling StatefulSet shardserve-worker"), "{}", status.message());
        assert!(status.message().contains("cannot patch resource \"statefulsets/scale\""), "{}", status.message());
        // Nothing waited for a scale that did not happen.
        assert!(!log.lock().unwrap().iter().any(|l| l.starts_with("settle")));
    }

    #[tokio::test]
    async fn zero_workers_is_refused_before_any_request() {
        let log = Log::default();
        let set = mock(2, log.clone(), false);
        let err = scale(&set, 0, drainer(log.clone()), settler(log.clone())).await.unwrap_err();
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::InvalidArgument);
        assert!(log.lock().unwrap().is_empty());
    }
}
