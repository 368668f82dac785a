//! The real `kube` client against the fake, reached through a kubeconfig as a cluster would be.

use std::collections::BTreeMap;
use std::time::Duration;

use fake_kube::{FakeKube, Kind, Options};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Event, Pod, Service};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Client, Config, ResourceExt};
use serde_json::json;

mod common;

use common::{NS, apply, apply_pod, phase, pod, start, wait_for};

fn waiting_reason(pod: &Pod) -> Option<String> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.first()?.state.as_ref()?.waiting.as_ref()?.reason.clone()
}

fn api_error(result: Result<impl std::fmt::Debug, kube::Error>) -> (u16, String) {
    match result {
        Err(kube::Error::Api(status)) => (status.code, status.reason),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_written_kubeconfig_reaches_discovery_for_kubernetes_1_33_and_core_v1() {
    let fake = FakeKube::start(Options::default()).await.expect("the fake binds a port");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("kubeconfig");
    fake.write_kubeconfig(&path, "team-a").expect("kubeconfig written");

    let kubeconfig = Kubeconfig::read_from(&path).expect("kube reads the file");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a config");
    let client = Client::try_from(config).expect("a client");
    let version = client.apiserver_version().await.expect("version");
    let discovery = kube::Discovery::new(client.clone()).run().await.expect("discovery");

    assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "33"));
    let core = discovery.get("").expect("the core group");
    assert!(core.recommended_resources().iter().any(|(r, _)| r.kind == "Pod"));
    assert_eq!(client.default_namespace(), "team-a");
    assert!(fake.requests().other >= 3);
}

#[tokio::test]
async fn an_applied_pod_is_listed_by_label_and_becomes_running_with_an_ip() {
    let (fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);

    let created = apply_pod(&pods, &pod("p1", "nginx:1", "1")).await.expect("apply creates");
    apply_pod(&pods, &pod("p2", "nginx:1", "1")).await.expect("apply creates");
    let selected = pods.list(&ListParams::default().labels("instance=p1,app")).await.expect("list");
    let running = wait_for(&pods, "p1", |p| phase(p) == "Running").await;

    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    assert_eq!(phase(&created), "Pending");
    assert_eq!(selected.items.iter().map(|p| p.name_any()).collect::<Vec<_>>(), ["p1"]);
    let status = running.status.expect("status");
    assert!(status.pod_ip.expect("pod IP").starts_with("10.244."));
    assert!(status.container_statuses.expect("statuses")[0].ready);
    assert_eq!(fake.get(Kind::Pod, NS, "p1").expect("stored")["status"]["phase"], "Running");
}

#[tokio::test]
async fn a_list_is_paged_with_continue_tokens() {
    let (_fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    for i in 0..5 {
        apply_pod(&pods, &pod(&format!("p{i}"), "nginx:1", "1")).await.expect("apply");
    }

    let first = pods.list(&ListParams::default().limit(2)).await.expect("page 1");
    let token = first.metadata.continue_.clone().expect("a continue token");
    let rest =
        pods.list(&ListParams::default().limit(10).continue_token(&token)).await.expect("page 2");

    assert_eq!(first.items.len(), 2);
    assert_eq!(rest.items.len(), 3);
    assert_eq!(rest.metadata.resource_version, first.metadata.resource_version);
    assert!(rest.metadata.continue_.is_none_or(|c| c.is_empty()));
}

#[tokio::test]
async fn a_failing_image_waits_in_err_image_pull_then_back_off_then_recovers() {
    let opts = Options { failing_images: vec!["broken:1".into()], ..Options::default() };
    let (fake, client) = start(opts).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);

    apply_pod(&pods, &pod("p", "broken:1", "1")).await.expect("apply");
    let pulling = wait_for(&pods, "p", |p| waiting_reason(p).is_some()).await;
    wait_for(&pods, "p", |p| waiting_reason(p).as_deref() == Some("ImagePullBackOff")).await;
    fake.set_image_failing("broken:1", false);
    let running = wait_for(&pods, "p", |p| phase(p) == "Running").await;

    assert_eq!(waiting_reason(&pulling).as_deref(), Some("ErrImagePull"));
    assert_eq!(phase(&pulling), "Pending");
    assert_eq!(waiting_reason(&running), None);
}

#[tokio::test]
async fn a_pod_whose_node_selector_is_not_met_is_unschedulable() {
    let labels = BTreeMap::from([("gpu".to_string(), "none".to_string())]);
    let (_fake, client) = start(Options { node_labels: Some(labels), ..Options::default() }).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    let mut gpu_pod = pod("p", "nginx:1", "1");
    gpu_pod.spec.as_mut().expect("spec").node_selector =
        Some([("gpu".into(), "a100".into())].into());

    apply_pod(&pods, &gpu_pod).await.expect("apply");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let stored = pods.get("p").await.expect("get");

    let conditions = stored.status.as_ref().and_then(|s| s.conditions.clone()).expect("conditions");
    assert_eq!(phase(&stored), "Pending");
    assert_eq!(conditions[0].reason.as_deref(), Some("Unschedulable"));
}

/// The events of pod `name`, as `kubectl describe` lists them.
async fn events_of(client: &Client, name: &str) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    let selector = format!("involvedObject.name={name},involvedObject.kind=Pod");
    events.list(&ListParams::default().fields(&selector)).await.expect("list events").items
}

fn reasons(events: &[Event]) -> Vec<(String, String)> {
    let mut reasons: Vec<(String, String)> = events
        .iter()
        .map(|e| (e.type_.clone().unwrap_or_default(), e.reason.clone().unwrap_or_default()))
        .collect();
    reasons.sort();
    reasons
}

#[tokio::test]
async fn a_failing_image_is_told_by_events_of_its_pod_only() {
    let opts = Options { failing_images: vec!["broken:1".into()], ..Options::default() };
    let (fake, client) = start(opts).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);

    apply_pod(&pods, &pod("p", "broken:1", "1")).await.expect("apply");
    apply_pod(&pods, &pod("q", "nginx:1", "1")).await.expect("apply");
    wait_for(&pods, "p", |p| waiting_reason(p).as_deref() == Some("ImagePullBackOff")).await;
    wait_for(&pods, "q", |p| phase(p) == "Running").await;
    let mounting = fake.record_event(NS, "p", "Warning", "FailedMount", "secret \"s\" not found");
    fake.record_event(NS, "p", "Warning", "FailedMount", "secret \"s\" not found");
    let events = events_of(&client, "p").await;

    let warning = |r: &str| ("Warning".to_string(), r.to_string());
    assert_eq!(
        reasons(&events),
        [
            ("Normal".into(), "Scheduled".into()),
            warning("BackOff"),
            warning("Failed"),
            warning("FailedMount")
        ]
    );
    let failed = events.iter().find(|e| e.reason.as_deref() == Some("Failed")).unwrap();
    assert_eq!(
        failed.message.as_deref(),
        Some(
            "Failed to pull image \"broken:1\": failed to pull and unpack image \"broken:1\": not found"
        )
    );
    assert_eq!(failed.involved_object.name.as_deref(), Some("p"));
    let mount = events.iter().find(|e| e.reason.as_deref() == Some("FailedMount")).unwrap();
    assert_eq!(mount.count, Some(2), "a repeat is counted");
    assert!(mounting.is_some());
    assert_eq!(
        reasons(&events_of(&client, "q").await),
        [("Normal".into(), "Scheduled".into()), ("Normal".into(), "Started".into())]
    );
    assert!(fake.record_event(NS, "missing", "Warning", "X", "y").is_none());
}

#[tokio::test]
async fn a_pod_asking_for_more_gpus_than_the_node_has_free_is_unschedulable() {
    let (_fake, client) = start(Options { node_gpus: Some(1), ..Options::default() }).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let gpu_pod = |name: &str| {
        let mut p = pod(name, "nginx:1", "1");
        let resources = p.spec.as_mut().unwrap().containers[0].resources.as_mut().unwrap();
        resources.limits.as_mut().unwrap().insert(
            "nvidia.com/gpu".into(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("1".into()),
        );
        p
    };

    apply_pod(&pods, &gpu_pod("first")).await.expect("apply");
    apply_pod(&pods, &gpu_pod("second")).await.expect("apply");
    wait_for(&pods, "first", |p| phase(p) == "Running").await;
    let second = pods.get("second").await.expect("get");

    let conditions = second.status.as_ref().and_then(|s| s.conditions.clone()).expect("conditions");
    assert_eq!(conditions[0].reason.as_deref(), Some("Unschedulable"));
    let message = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.";
    assert_eq!(conditions[0].message.as_deref(), Some(message));
    let events = events_of(&client, "second").await;
    assert_eq!(reasons(&events), [("Warning".into(), "FailedScheduling".into())]);
    assert_eq!(events[0].message.as_deref(), Some(message));
}

#[tokio::test]
async fn a_service_keeps_its_cluster_ip_across_applies() {
    let (_fake, client) = start(Options::default()).await;
    let services: Api<Service> = Api::namespaced(client, NS);
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
        "spec": {"selector": {"instance": "p"}, "ports": [{"port": 22}]},
    }))
    .expect("a valid service");

    let first = services.patch("s", &apply(), &Patch::Apply(&service)).await.expect("apply");
    let second = services.patch("s", &apply(), &Patch::Apply(&service)).await.expect("re-apply");

    let ip = first.spec.as_ref().and_then(|s| s.cluster_ip.clone()).expect("a cluster IP");
    assert!(ip.starts_with("10.96."));
    assert_eq!(second.spec.and_then(|s| s.cluster_ip), Some(ip));
    assert_eq!(second.metadata.resource_version, first.metadata.resource_version);
}

#[tokio::test]
async fn a_services_cluster_ip_is_immutable_also_to_and_from_headless() {
    let (_fake, client) = start(Options::default()).await;
    let services: Api<Service> = Api::namespaced(client, NS);
    let service = |spec: serde_json::Value| -> Service {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": spec,
        }))
        .expect("a valid service")
    };
    let headed = service(json!({"selector": {"i": "p"}, "ports": [{"port": 22}]}));
    let headless = service(json!({"selector": {"i": "p"}, "clusterIP": "None"}));

    services.patch("s", &apply(), &Patch::Apply(&headed)).await.expect("apply");
    let turned = services.patch("s", &apply(), &Patch::Apply(&headless)).await;
    assert_eq!(api_error(turned), (422, "Invalid".to_string()));
    services.delete("s", &Default::default()).await.expect("delete");
    let created = services.patch("s", &apply(), &Patch::Apply(&headless)).await.expect("apply");
    assert_eq!(created.spec.and_then(|s| s.cluster_ip).as_deref(), Some("None"));
    // As the real API server, an apply that leaves clusterIP out keeps the allocated value.
    let back = services.patch("s", &apply(), &Patch::Apply(&headed)).await.expect("apply");
    assert_eq!(back.spec.and_then(|s| s.cluster_ip).as_deref(), Some("None"));
}

#[tokio::test]
async fn changing_a_pods_resources_is_invalid_but_changing_its_image_is_not() {
    let (_fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    apply_pod(&pods, &pod("p", "nginx:1", "1")).await.expect("apply");

    let resized = apply_pod(&pods, &pod("p", "nginx:1", "2")).await;
    let updated = apply_pod(&pods, &pod("p", "nginx:2", "1")).await.expect("image change");

    assert_eq!(api_error(resized), (422, "Invalid".to_string()));
    assert_eq!(updated.spec.expect("spec").containers[0].image.as_deref(), Some("nginx:2"));
    assert_eq!(updated.metadata.generation, Some(2));
}

#[tokio::test]
async fn creating_an_existing_name_is_409_and_getting_a_missing_one_is_404() {
    let (_fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    pods.create(&PostParams::default(), &pod("p", "nginx:1", "1")).await.expect("create");

    let again = pods.create(&PostParams::default(), &pod("p", "nginx:1", "1")).await;
    let missing = pods.get("nope").await;

    assert_eq!(api_error(again), (409, "AlreadyExists".to_string()));
    assert_eq!(api_error(missing), (404, "NotFound".to_string()));
}

#[tokio::test]
async fn a_stale_resource_version_in_a_merge_patch_is_a_conflict() {
    let (_fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    let created = apply_pod(&pods, &pod("p", "nginx:1", "1")).await.expect("apply");
    wait_for(&pods, "p", |p| phase(p) == "Running").await;

    let stale =
        json!({"metadata": {"resourceVersion": created.resource_version(), "labels": {"x": "1"}}});
    let result = pods.patch("p", &PatchParams::default(), &Patch::Merge(&stale)).await;

    assert_eq!(api_error(result), (409, "Conflict".to_string()));
}

#[tokio::test]
async fn a_deleted_pod_keeps_its_name_until_it_has_terminated() {
    let opts = Options { termination_delay: Duration::from_millis(300), ..Options::default() };
    let (fake, client) = start(opts).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    apply_pod(&pods, &pod("p", "nginx:1", "1")).await.expect("apply");

    pods.delete("p", &DeleteParams::default()).await.expect("delete");
    let during = pods.create(&PostParams::default(), &pod("p", "nginx:1", "1")).await;
    wait_for_gone(&fake, "p").await;
    let after = pods.create(&PostParams::default(), &pod("p", "nginx:1", "1")).await;

    assert_eq!(api_error(during), (409, "AlreadyExists".to_string()));
    assert!(after.is_ok());
}

async fn wait_for_gone(fake: &FakeKube, name: &str) {
    for _ in 0..500 {
        if fake.get(Kind::Pod, NS, name).is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("pod {name} was not removed");
}

#[tokio::test]
async fn a_finalizer_holds_a_deleted_object_until_a_patch_removes_it() {
    let (fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mut held = pod("p", "nginx:1", "1");
    held.metadata.finalizers = Some(vec!["resource/cleanup".into()]);
    let created = apply_pod(&pods, &held).await.expect("apply");
    let (params, rv) = (WatchParams::default().labels("instance=p"), created.resource_version());
    let mut events = Box::pin(pods.watch(&params, &rv.expect("rv")).await.expect("watch"));

    pods.delete("p", &DeleteParams::default()).await.expect("delete");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let still = pods.get("p").await.expect("still there");
    let unblock = json!({"metadata": {"finalizers": null}});
    pods.patch("p", &PatchParams::default(), &Patch::Merge(&unblock)).await.expect("patch");
    wait_for_gone(&fake, "p").await;
    let mut kinds = Vec::new();
    while let Some(event) = events.try_next().await.expect("watch event") {
        kinds.push(format!("{event:?}"));
        if matches!(event, WatchEvent::Deleted(_)) {
            break;
        }
    }

    assert!(still.metadata.deletion_timestamp.is_some());
    assert_eq!(kinds.last().map(String::as_str), Some("Deleted event"));
    assert!(kinds.iter().any(|k| k == "Modified event"));
}

#[tokio::test]
async fn a_json_patch_removing_the_last_finalizer_deletes_a_service_at_once() {
    let (fake, client) = start(Options::default()).await;
    let services: Api<Service> = Api::namespaced(client, NS);
    let service: Service =
        serde_json::from_value(json!({"metadata": {"name": "s", "finalizers": ["f"]}}))
            .expect("a valid service");
    services.create(&PostParams::default(), &service).await.expect("create");

    services.delete("s", &DeleteParams::default()).await.expect("delete");
    let held = fake.get(Kind::Service, NS, "s");
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/finalizers/0", "value": "f"},
        {"op": "remove", "path": "/metadata/finalizers/0"}
    ]))
    .expect("a JSON patch");
    services.patch("s", &PatchParams::default(), &Patch::<()>::Json(ops)).await.expect("patch");

    assert!(held.expect("held by the finalizer")["metadata"]["deletionTimestamp"].is_string());
    assert!(fake.get(Kind::Service, NS, "s").is_none());
}

#[tokio::test]
async fn the_default_watcher_sees_init_then_apply_then_delete() {
    let (_fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    apply_pod(&pods, &pod("before", "nginx:1", "1")).await.expect("apply");
    let config = watcher::Config::default().labels("app=resource");
    let mut events: Events = Box::pin(watcher(pods.clone(), config));

    let init = next_events(&mut events, 3).await;
    apply_pod(&pods, &pod("after", "nginx:1", "1")).await.expect("apply");
    let added = next_events(&mut events, 1).await;
    pods.delete("before", &DeleteParams::default().grace_period(0)).await.expect("delete");
    let later = next_until_delete(&mut events).await;

    assert_eq!(init, ["Init", "InitApply before", "InitDone"]);
    assert_eq!(added, ["Apply after"]);
    assert_eq!(later.last().map(String::as_str), Some("Delete before"));
}

type Events = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Send>,
>;

fn describe(event: watcher::Event<Pod>) -> String {
    match event {
        watcher::Event::Init => "Init".into(),
        watcher::Event::InitApply(p) => format!("InitApply {}", p.name_any()),
        watcher::Event::InitDone => "InitDone".into(),
        watcher::Event::Apply(p) => format!("Apply {}", p.name_any()),
        watcher::Event::Delete(p) => format!("Delete {}", p.name_any()),
    }
}

async fn next_events(events: &mut Events, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next()).await;
        out.push(describe(event.expect("an event in time").expect("open").expect("no error")));
    }
    out
}

async fn next_until_delete(events: &mut Events) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    while !out.last().is_some_and(|e| e.starts_with("Delete")) {
        out.extend(next_events(events, 1).await);
    }
    out
}

/// Every event of a one-second watch from `rv`.
async fn watch_from(pods: &Api<Pod>, rv: &str) -> Vec<WatchEvent<Pod>> {
    let stream = pods.watch(&WatchParams::default().timeout(1), rv).await.expect("watch");
    stream.try_collect().await.expect("events")
}

#[tokio::test]
async fn a_watch_resumed_from_an_old_version_gets_the_later_events() {
    let (_fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    let first = apply_pod(&pods, &pod("a", "nginx:1", "1")).await.expect("apply");
    apply_pod(&pods, &pod("b", "nginx:1", "1")).await.expect("apply");

    let events = watch_from(&pods, &first.resource_version().expect("rv")).await;

    let added: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Added(p) => Some(p.name_any()),
            _ => None,
        })
        .collect();
    assert_eq!(added, ["b"]);
}

#[tokio::test]
async fn a_watch_from_before_the_kept_history_is_gone() {
    let (_fake, client) = start(Options { watch_history: 2, ..Options::default() }).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    let first = apply_pod(&pods, &pod("a", "nginx:1", "1")).await.expect("apply");
    for name in ["b", "c", "d"] {
        apply_pod(&pods, &pod(name, "nginx:1", "1")).await.expect("apply");
    }

    let events = watch_from(&pods, &first.resource_version().expect("rv")).await;

    match events.first() {
        Some(WatchEvent::Error(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected 410 Gone, got {other:?}"),
    }
}

#[tokio::test]
async fn requests_are_counted_by_verb() {
    let (fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    let before = fake.requests();

    apply_pod(&pods, &pod("p", "nginx:1", "1")).await.expect("apply");
    pods.get("p").await.expect("get");
    pods.list(&ListParams::default()).await.expect("list");
    pods.delete("p", &DeleteParams::default()).await.expect("delete");

    let counts = fake.requests().since(&before);
    assert_eq!(
        (counts.patch, counts.get, counts.list, counts.delete, counts.total),
        (1, 1, 1, 1, 4)
    );
}

#[tokio::test]
async fn shutdown_ends_open_watches() {
    let (fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    let stream = pods.watch(&WatchParams::default(), "0").await.expect("watch");

    tokio::time::timeout(Duration::from_secs(5), fake.shutdown()).await.expect("shutdown in time");

    let rest: Vec<_> = tokio::time::timeout(Duration::from_secs(5), stream.collect::<Vec<_>>())
        .await
        .expect("ended");
    assert!(rest.is_empty());
}

/// Sends one raw HTTP/1.1 request and returns the status code and body.
async fn raw(fake: &FakeKube, head: &str, body: &str) -> (u16, serde_json::Value) {
    let (code, _, body) = common::raw(fake, head, body).await;
    (code, body)
}

#[tokio::test]
async fn malformed_requests_get_the_api_servers_status_errors() {
    let fake = FakeKube::start(Options::default()).await.expect("the fake binds a port");
    let pod = r#"{"metadata":{"name":"p"},"spec":{"containers":[]}}"#;
    let apply = "PATCH /api/v1/namespaces/default/pods/p HTTP/1.1\r\nHost: x\r\nContent-Type: application/apply-patch+yaml";

    let no_manager = raw(&fake, apply, pod).await;
    let yaml =
        raw(&fake, &apply.replace("pods/p ", "pods/p?fieldManager=t "), "metadata:\n  name: p\n")
            .await;
    let other_group =
        raw(&fake, "GET /apis/apps/v1/namespaces/default/deployments HTTP/1.1\r\nHost: x", "")
            .await;
    let no_namespace =
        raw(&fake, "POST /api/v1/namespaces/nope/pods HTTP/1.1\r\nHost: x", pod).await;

    assert_eq!((no_manager.0, no_manager.1["reason"].as_str()), (422, Some("Invalid")));
    assert_eq!((yaml.0, yaml.1["reason"].as_str()), (400, Some("BadRequest")));
    assert_eq!((other_group.0, other_group.1["kind"].as_str()), (404, Some("Status")));
    assert_eq!(
        (no_namespace.0, no_namespace.1["details"]["kind"].as_str()),
        (404, Some("namespaces"))
    );
}

#[tokio::test]
async fn a_status_patch_changes_only_the_status() {
    let (fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    apply_pod(&pods, &pod("p", "nginx:1", "1")).await.expect("apply");
    wait_for(&pods, "p", |p| phase(p) == "Running").await;

    let failed = json!({"status": {"phase": "Failed"}, "spec": {"containers": []}});
    let patched = pods
        .patch_status("p", &PatchParams::default(), &Patch::Merge(&failed))
        .await
        .expect("patch");

    assert_eq!(phase(&patched), "Failed");
    assert_eq!(patched.spec.expect("spec").containers.len(), 1);
    assert_eq!(fake.get(Kind::Pod, NS, "p").expect("stored")["status"]["phase"], "Failed");
}
