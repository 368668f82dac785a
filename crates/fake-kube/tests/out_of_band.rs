//! Objects created and edited behind the client's back, as seen through `kube`.

mod common;

use common::{NS, api_status, apply_pod, phase, pod, pod_json, start, wait_for};
use fake_kube::{Kind, Options};
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use serde_json::json;

fn cpu_limit(pod: &Pod) -> Option<String> {
    let container = pod.spec.as_ref()?.containers.first()?;
    let limits = container.resources.as_ref()?.limits.as_ref()?;
    limits.get("cpu").map(|q| q.0.clone())
}

#[tokio::test]
async fn patch_out_of_band_changes_a_pods_resources_and_a_watch_sees_it() {
    let (fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    apply_pod(&pods, &pod("p", "nginx:1", "1")).await.expect("apply");
    let running = wait_for(&pods, "p", |p| phase(p) == "Running").await;
    let rv = running.resource_version().expect("rv");
    let stream = pods.watch(&WatchParams::default().timeout(1), &rv).await.expect("watch");

    let resized = json!({"spec": {"containers": [
        {"name": "main", "image": "nginx:1", "resources": {"limits": {"cpu": "4"}}}]}});
    let patched = fake.patch_out_of_band(Kind::Pod, NS, "p", resized).expect("patched");
    let reapplied = apply_pod(&pods, &pod("p", "nginx:1", "1")).await;
    let events: Vec<_> = stream.try_collect().await.expect("events");

    assert_ne!(patched["metadata"]["resourceVersion"].as_str(), Some(rv.as_str()));
    assert_eq!(patched["metadata"]["generation"], 2);
    match events.as_slice() {
        [WatchEvent::Modified(seen)] => assert_eq!(cpu_limit(seen).as_deref(), Some("4")),
        other => panic!("expected one MODIFIED, got {other:?}"),
    }
    let status = api_status(reapplied);
    assert_eq!(status.code, 422, "a client may still not change the resources back");
}

#[tokio::test]
async fn patch_out_of_band_may_set_the_status_and_reports_errors_as_text() {
    let (fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    apply_pod(&pods, &pod("p", "nginx:1", "1")).await.expect("apply");
    wait_for(&pods, "p", |p| phase(p) == "Running").await;

    let failed = fake.patch_out_of_band(Kind::Pod, NS, "p", json!({"status": {"phase": "Failed"}}));
    let missing = fake.patch_out_of_band(Kind::Pod, NS, "nope", json!({}));
    let stale = fake.patch_out_of_band(
        Kind::Pod,
        NS,
        "p",
        json!({"metadata": {"resourceVersion": "1", "labels": {"x": "1"}}}),
    );
    let stored = pods.get("p").await.expect("get");

    assert_eq!(failed.expect("patched")["status"]["phase"], "Failed");
    assert_eq!(phase(&stored), "Failed");
    assert_eq!(missing, Err("404 NotFound: pods \"nope\" not found".to_string()));
    assert!(stale.expect_err("a stale version").starts_with("409 Conflict"));
}

#[tokio::test]
async fn a_pod_created_out_of_band_is_run_by_the_kubelet_and_listed() {
    let (fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);

    let created = fake.create_out_of_band(Kind::Pod, NS, pod_json("stray", "nginx:1", "8"));
    let taken = fake.create_out_of_band(Kind::Pod, NS, pod_json("stray", "nginx:1", "8"));
    let elsewhere = fake.create_out_of_band(Kind::Pod, "nope", pod_json("x", "nginx:1", "1"));
    let running = wait_for(&pods, "stray", |p| phase(p) == "Running").await;
    let listed = pods.list(&ListParams::default().labels("app=resource")).await.expect("list");

    let created = created.expect("created");
    assert!(created["metadata"]["uid"].is_string());
    assert_eq!(created["status"]["phase"], "Pending");
    assert_eq!(taken, Err("409 AlreadyExists: pods \"stray\" already exists".to_string()));
    assert_eq!(elsewhere, Err("404 NotFound: namespaces \"nope\" not found".to_string()));
    assert_eq!(cpu_limit(&running).as_deref(), Some("8"));
    assert_eq!(listed.items.iter().map(|p| p.name_any()).collect::<Vec<_>>(), ["stray"]);
}

#[tokio::test]
async fn a_namespace_created_out_of_band_accepts_pods() {
    let (fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, "other");

    let namespace =
        fake.create_out_of_band(Kind::Namespace, "", json!({"metadata": {"name": "other"}}));
    let created = apply_pod(&pods, &pod("p", "nginx:1", "1")).await;

    assert_eq!(namespace.expect("created")["status"]["phase"], "Active");
    assert!(created.is_ok());
}
