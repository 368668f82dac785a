//! Namespace deletion and namespace admission, through `kube`.

mod common;

use std::time::Duration;

use common::{api_status, apply, apply_pod, pod, start, wait_until};
use fake_kube::{FakeKube, Kind, Options};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

const TEAM: &str = "team";

fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"selector": {"instance": name}, "ports": [{"port": 22}]},
    }))
    .expect("a valid service")
}

fn namespace(name: &str) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": name}})).expect("a valid namespace")
}

fn ns_phase(ns: &Namespace) -> &str {
    ns.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or_default()
}

/// A watch of `api` from its current version, as a stream of event descriptions.
async fn watch_descriptions<K>(api: &Api<K>) -> impl futures::Stream<Item = String> + use<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let rv = api.list_metadata(&Default::default()).await.expect("list").metadata.resource_version;
    let stream = api.watch(&WatchParams::default(), &rv.expect("rv")).await.expect("watch");
    stream.map(|e| match e.expect("a watch event") {
        WatchEvent::Added(o) => format!("ADDED {}", o.name_any()),
        WatchEvent::Modified(o) => format!("MODIFIED {}", o.name_any()),
        WatchEvent::Deleted(o) => format!("DELETED {}", o.name_any()),
        other => format!("{other:?}"),
    })
}

async fn take_until_deleted(
    events: impl futures::Stream<Item = String>,
    name: &str,
) -> Vec<String> {
    let last = format!("DELETED {name}");
    let mut events = std::pin::pin!(events);
    let mut out = Vec::new();
    while out.last() != Some(&last) {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next()).await;
        out.push(event.expect("an event in time").expect("the watch is open"));
    }
    out
}

fn namespace_gone(fake: &FakeKube, name: &str) -> bool {
    fake.get(Kind::Namespace, "", name).is_none()
}

async fn team(client: &Client, fake: &FakeKube) -> (Api<Pod>, Api<Service>, Api<Namespace>) {
    fake.ensure_namespace(TEAM);
    let pods = Api::namespaced(client.clone(), TEAM);
    let services = Api::namespaced(client.clone(), TEAM);
    (pods, services, Api::all(client.clone()))
}

#[tokio::test]
async fn deleting_a_namespace_terminates_it_deletes_its_objects_then_removes_it() {
    let opts = Options { termination_delay: Duration::from_millis(300), ..Options::default() };
    let (fake, client) = start(opts).await;
    let (pods, services, namespaces) = team(&client, &fake).await;
    apply_pod(&pods, &pod("p", "nginx:1", "1")).await.expect("apply");
    services.patch("s", &apply(), &Patch::Apply(&service("s"))).await.expect("apply");
    let namespace_events = watch_descriptions(&namespaces).await;
    let pod_events = watch_descriptions(&pods).await;

    let deleted = namespaces.delete(TEAM, &DeleteParams::default()).await.expect("delete");
    let terminating = deleted.left().expect("the namespace, not a Status");
    let service_gone = fake.get(Kind::Service, TEAM, "s").is_none();
    let pod_held = fake.get(Kind::Pod, TEAM, "p").expect("terminating");
    let refused = pods.create(&PostParams::default(), &pod("q", "nginx:1", "1")).await;
    let applied = apply_pod(&pods, &pod("q", "nginx:1", "1")).await;
    let again = namespaces.delete(TEAM, &DeleteParams::default()).await;
    let recreate = namespaces.create(&PostParams::default(), &namespace(TEAM)).await;
    let namespace_events = take_until_deleted(namespace_events, TEAM).await;
    let pod_events = take_until_deleted(pod_events, "p").await;

    assert_eq!(ns_phase(&terminating), "Terminating");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert!(service_gone);
    assert!(pod_held["metadata"]["deletionTimestamp"].is_string());
    let refused = api_status(refused);
    assert_eq!((refused.code, refused.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        refused.message,
        "unable to create new content in namespace team because it is being terminated"
    );
    let details = refused.details.expect("details");
    assert_eq!((details.name.as_str(), details.kind.as_str()), ("q", "pods"));
    assert_eq!(api_status(applied).code, 403);
    assert_eq!(api_status(again).code, 409);
    let recreate = api_status(recreate);
    assert_eq!((recreate.code, recreate.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(recreate.message, "object is being deleted: namespaces \"team\" already exists");
    assert_eq!(namespace_events, ["MODIFIED team", "DELETED team"]);
    assert_eq!(pod_events.first().map(String::as_str), Some("MODIFIED p"));
    assert!(namespace_gone(&fake, TEAM));
    assert!(fake.get(Kind::Pod, TEAM, "p").is_none());
}

#[tokio::test]
async fn a_finalizer_keeps_a_terminating_namespace_until_a_patch_removes_it() {
    let (fake, client) = start(Options::default()).await;
    let (_pods, services, _namespaces) = team(&client, &fake).await;
    let mut held = service("s");
    held.metadata.finalizers = Some(vec!["resource/cleanup".into()]);
    services.create(&PostParams::default(), &held).await.expect("create");

    assert!(fake.delete_out_of_band(Kind::Namespace, "", TEAM));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let still = fake.get(Kind::Namespace, "", TEAM).expect("held by its content");
    let relabel = json!({"metadata": {"labels": {"x": "1"}}});
    let updated = services.patch("s", &PatchParams::default(), &Patch::Merge(&relabel)).await;
    let unblock = json!({"metadata": {"finalizers": null}});
    services.patch("s", &PatchParams::default(), &Patch::Merge(&unblock)).await.expect("patch");

    assert_eq!(still["status"]["phase"], "Terminating");
    let updated = updated.expect("an existing object may still be updated");
    assert!(updated.metadata.deletion_timestamp.is_some());
    wait_until("the namespace's removal", || namespace_gone(&fake, TEAM)).await;
    assert!(fake.get(Kind::Service, TEAM, "s").is_none());
}

#[tokio::test]
async fn a_pod_finalizer_holds_the_namespace_and_the_kubelet_finishes_it() {
    let (fake, client) = start(Options::default()).await;
    let (pods, _services, namespaces) = team(&client, &fake).await;
    let mut held = pod("p", "nginx:1", "1");
    held.metadata.finalizers = Some(vec!["resource/cleanup".into()]);
    apply_pod(&pods, &held).await.expect("apply");

    namespaces.delete(TEAM, &DeleteParams::default()).await.expect("delete");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let still = namespaces.get(TEAM).await.expect("held by the pod");
    let unblock = json!({"metadata": {"finalizers": null}});
    pods.patch("p", &PatchParams::default(), &Patch::Merge(&unblock)).await.expect("patch");

    assert_eq!(ns_phase(&still), "Terminating");
    wait_until("the namespace's removal", || namespace_gone(&fake, TEAM)).await;
    let list = namespaces.list(&Default::default()).await.expect("list");
    assert_eq!(list.items.iter().map(|n| n.name_any()).collect::<Vec<_>>(), ["default"]);
}

#[tokio::test]
async fn an_empty_namespace_is_removed_as_soon_as_it_is_deleted() {
    let (fake, client) = start(Options::default()).await;
    let (_pods, _services, namespaces) = team(&client, &fake).await;

    let deleted = namespaces.delete(TEAM, &DeleteParams::default()).await.expect("delete");
    let missing = namespaces.delete(TEAM, &DeleteParams::default()).await;
    let created = namespaces.create(&PostParams::default(), &namespace(TEAM)).await;

    assert_eq!(ns_phase(&deleted.left().expect("the namespace")), "Terminating");
    assert_eq!(api_status(missing).code, 404);
    assert_eq!(ns_phase(&created.expect("the name is free again")), "Active");
    assert!(!fake.delete_out_of_band(Kind::Namespace, "", "nope"));
}

#[tokio::test]
async fn creating_in_a_missing_namespace_is_404_by_post_and_by_apply() {
    let (_fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, "nope");

    let posted = pods.create(&PostParams::default(), &pod("p", "nginx:1", "1")).await;
    let applied = apply_pod(&pods, &pod("p", "nginx:1", "1")).await;

    for status in [api_status(posted), api_status(applied)] {
        assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
        assert_eq!(status.message, "namespaces \"nope\" not found");
        let details = status.details.expect("details");
        assert_eq!((details.name.as_str(), details.kind.as_str()), ("nope", "namespaces"));
    }
}

#[tokio::test]
async fn a_watch_of_pods_sees_the_deletions_of_a_namespace() {
    let (fake, client) = start(Options::default()).await;
    let (pods, _services, namespaces) = team(&client, &fake).await;
    for name in ["a", "b"] {
        apply_pod(&pods, &pod(name, "nginx:1", "1")).await.expect("apply");
    }
    common::wait_for(&pods, "b", |p| common::phase(p) == "Running").await;
    let all_pods: Api<Pod> = Api::all(client);
    let rv = all_pods.list_metadata(&Default::default()).await.expect("list").metadata;
    let stream = all_pods
        .watch(&WatchParams::default().timeout(2), &rv.resource_version.expect("rv"))
        .await
        .expect("watch");

    namespaces.delete(TEAM, &DeleteParams::default()).await.expect("delete");
    wait_until("the namespace's removal", || namespace_gone(&fake, TEAM)).await;
    let events: Vec<_> = stream.try_collect().await.expect("events");

    let deleted: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Deleted(p) => Some(p.name_any()),
            _ => None,
        })
        .collect();
    assert_eq!(deleted, ["a", "b"]);
}
