//! Injected faults, ended watches, expired history and the request log, through `kube`.

mod common;

use std::time::{Duration, Instant};

use common::{NS, api_status, apply_pod, pod, raw, start};
use fake_kube::{Fault, Kind, Options, Verb};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent};
use kube::core::response::StatusSummary;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;

async fn label(pods: &Api<Pod>, name: &str, value: &str) -> Result<Pod, kube::Error> {
    let patch = json!({"metadata": {"labels": {"touched": value}}});
    pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await
}

#[tokio::test]
async fn a_status_fault_answers_matching_requests_with_a_status_until_used_up() {
    let (fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    apply_pod(&pods, &pod("inst-7", "nginx:1", "1")).await.expect("apply");
    apply_pod(&pods, &pod("inst-8", "nginx:1", "1")).await.expect("apply");
    // 500 is not one of the codes kube retries on its own (429, 503, 504).
    let fault = Fault::status(500, "InternalError")
        .message("etcd is slow")
        .retry_after(2)
        .verb(Verb::Patch)
        .kind(Kind::Pod)
        .name("inst-7")
        .times(2);
    fake.inject(fault);
    let before = fake.requests();

    let first = label(&pods, "inst-7", "1").await;
    let other_name = label(&pods, "inst-8", "1").await;
    let other_verb = pods.get("inst-7").await;
    let second = label(&pods, "inst-7", "2").await;
    let used_up = label(&pods, "inst-7", "3").await;

    let status = api_status(first);
    assert_eq!((status.code, status.reason.as_str()), (500, "InternalError"));
    assert_eq!(status.message, "etcd is slow");
    assert_eq!(status.status, Some(StatusSummary::Failure));
    let details = status.details.expect("details");
    assert_eq!((details.retry_after_seconds, details.kind.as_str()), (2, "pods"));
    assert_eq!(details.name, "inst-7");
    assert!(other_name.is_ok() && other_verb.is_ok());
    assert_eq!(api_status(second).code, 500);
    assert_eq!(used_up.expect("the fault is used up").labels()["touched"], "3");
    assert_eq!(fake.requests().since(&before).patch, 4);
}

#[tokio::test]
async fn kube_waits_out_the_retry_after_of_a_503_and_the_log_shows_each_attempt() {
    let (fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    apply_pod(&pods, &pod("inst-7", "nginx:1", "1")).await.expect("apply");
    let fault = Fault::status(503, "ServiceUnavailable")
        .retry_after(1)
        .verb(Verb::Patch)
        .kind(Kind::Pod)
        .name("inst-7")
        .times(2);
    fake.inject(fault);
    let before = fake.request_log().len();

    let patched = label(&pods, "inst-7", "1").await;

    let log = fake.request_log();
    let attempts: Vec<_> = log[before..].iter().filter(|r| r.verb == Verb::Patch).collect();
    assert!(patched.is_ok(), "kube retried until the fault was used up: {patched:?}");
    assert_eq!(attempts.len(), 3);
    for pair in attempts.windows(2) {
        assert!(pair[1].at - pair[0].at >= Duration::from_millis(900), "Retry-After honoured");
    }
}

#[tokio::test]
async fn a_status_fault_with_retry_after_sends_the_header() {
    let (fake, _client) = start(Options::default()).await;
    fake.inject(Fault::status(429, "TooManyRequests").retry_after(7).kind(Kind::Pod));

    let (code, head, body) =
        raw(&fake, "GET /api/v1/namespaces/default/pods HTTP/1.1\r\nHost: x", "").await;
    let discovery = raw(&fake, "GET /version HTTP/1.1\r\nHost: x", "").await;

    assert_eq!(code, 429);
    assert!(head.to_ascii_lowercase().contains("\r\nretry-after: 7"), "{head}");
    assert_eq!(
        (body["kind"].as_str(), body["apiVersion"].as_str(), body["status"].as_str()),
        (Some("Status"), Some("v1"), Some("Failure"))
    );
    assert_eq!(
        (body["code"].as_u64(), body["details"]["retryAfterSeconds"].as_u64()),
        (Some(429), Some(7))
    );
    assert_eq!(discovery.0, 200, "a fault for a kind does not match discovery");
}

#[tokio::test]
async fn a_hang_fault_never_answers_and_a_delay_fault_answers_late() {
    let (fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    apply_pod(&pods, &pod("p", "nginx:1", "1")).await.expect("apply");
    let hang = fake.inject(Fault::hang().verb(Verb::Get).kind(Kind::Pod));

    let hung = tokio::time::timeout(Duration::from_millis(300), pods.get("p")).await;
    fake.remove_fault(hang);
    fake.inject(Fault::delay(Duration::from_millis(200)).verb(Verb::Get).times(1));
    let started = Instant::now();
    let delayed = pods.get("p").await;
    let delay = started.elapsed();
    let prompt = pods.get("p").await;

    assert!(hung.is_err(), "the hanging get answered: {hung:?}");
    assert!(delayed.is_ok() && delay >= Duration::from_millis(200), "{delay:?}");
    assert!(prompt.is_ok());
    assert_eq!(fake.requests().get, 3);
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_hanging_request() {
    let (fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    fake.inject(Fault::hang());
    let hanging = tokio::spawn(async move { pods.list(&ListParams::default()).await });
    tokio::time::sleep(Duration::from_millis(100)).await;

    let stopped = tokio::time::timeout(Duration::from_secs(3), fake.shutdown()).await;

    assert!(stopped.is_ok(), "shutdown waited for the hanging request");
    assert!(hanging.await.expect("the task ran").is_err());
}

/// Described events of a `watcher` of pods, polled by its own task so that it watches
/// again on its own; the small buffer keeps a failing watcher from spinning ahead.
type Events = tokio::sync::mpsc::Receiver<String>;

fn pod_watcher(client: Client) -> Events {
    let pods: Api<Pod> = Api::namespaced(client, NS);
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher(pods, watcher::Config::default()));
        while let Some(event) = events.next().await {
            if sender.send(describe(event)).await.is_err() {
                return;
            }
        }
    });
    receiver
}

fn describe(event: Result<watcher::Event<Pod>, watcher::Error>) -> String {
    match event {
        Ok(watcher::Event::Init) => "Init".into(),
        Ok(watcher::Event::InitApply(p)) => format!("InitApply {}", p.name_any()),
        Ok(watcher::Event::InitDone) => "InitDone".into(),
        Ok(watcher::Event::Apply(p)) => format!("Apply {}", p.name_any()),
        Ok(watcher::Event::Delete(p)) => format!("Delete {}", p.name_any()),
        Err(watcher::Error::WatchStartFailed(kube::Error::Api(s))) => {
            format!("WatchStartFailed {}", s.code)
        }
        Err(watcher::Error::WatchError(s)) => format!("WatchError {}", s.code),
        Err(other) => format!("{other:?}"),
    }
}

/// The next described event of the watcher; fails after 5 s.
async fn next(events: &mut Events) -> String {
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
    event.expect("an event in time").expect("the watcher runs")
}

async fn next_n(events: &mut Events, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(next(events).await);
    }
    out
}

/// Options under which the kubelet does not touch pods during a test.
fn idle_kubelet() -> Options {
    Options { kubelet_delay: Duration::from_secs(3600), ..Options::default() }
}

fn count(fake: &fake_kube::FakeKube, verb: Verb) -> usize {
    fake.request_log().iter().filter(|r| r.verb == verb && r.kind == Some(Kind::Pod)).count()
}

#[tokio::test]
async fn a_forbidden_watch_fault_reaches_the_watcher_until_it_is_removed() {
    let (fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let forbidden = fake.inject(Fault::status(403, "Forbidden").verb(Verb::Watch));
    let mut events = pod_watcher(client);

    let init = next_n(&mut events, 3).await;
    let refused = next_n(&mut events, 2).await;
    fake.remove_fault(forbidden);
    apply_pod(&pods, &pod("p", "nginx:1", "1")).await.expect("apply");
    let mut later = next(&mut events).await;
    while later.starts_with("WatchStartFailed") {
        later = next(&mut events).await;
    }

    assert_eq!(init, ["Init", "InitDone", "WatchStartFailed 403"]);
    assert_eq!(refused, ["WatchStartFailed 403", "WatchStartFailed 403"]);
    assert_eq!(later, "Apply p");
}

#[tokio::test]
async fn a_gone_watch_fault_is_an_error_event_and_the_watcher_relists() {
    let (fake, client) = start(idle_kubelet()).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    apply_pod(&pods, &pod("a", "nginx:1", "1")).await.expect("apply");
    fake.inject(Fault::status(410, "Expired").verb(Verb::Watch).times(1));
    let mut events = pod_watcher(client);

    let seen = next_n(&mut events, 7).await;

    let relisted = ["Init", "InitApply a", "InitDone"];
    assert_eq!(seen[..3], relisted);
    assert_eq!(seen[3], "WatchError 410");
    assert_eq!(seen[4..], relisted);
    assert_eq!(count(&fake, Verb::List), 2);
}

#[tokio::test]
async fn end_watches_ends_open_streams_and_the_watcher_watches_again() {
    let (fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let stream = pods.watch(&Default::default(), "0").await.expect("watch");
    let mut events = pod_watcher(client);
    let init = next_n(&mut events, 2).await;
    common::wait_until("the watcher's watch", || count(&fake, Verb::Watch) == 2).await;

    fake.end_watches();
    let ended = tokio::time::timeout(Duration::from_secs(5), stream.collect::<Vec<_>>()).await;
    common::wait_until("a new watch", || count(&fake, Verb::Watch) == 3).await;
    apply_pod(&pods, &pod("p", "nginx:1", "1")).await.expect("apply");
    let later = next(&mut events).await;

    assert_eq!(init, ["Init", "InitDone"]);
    assert!(ended.is_ok(), "the raw watch did not end");
    assert_eq!(later, "Apply p");
    assert_eq!(count(&fake, Verb::List), 1, "no relist after a plain end");
}

#[tokio::test]
async fn after_expire_history_a_resumed_watch_is_gone_and_the_watcher_relists() {
    let (fake, client) = start(idle_kubelet()).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let first = apply_pod(&pods, &pod("a", "nginx:1", "1")).await.expect("apply");
    let old_rv = first.resource_version().expect("rv");
    let mut events = pod_watcher(client);
    let init = next_n(&mut events, 3).await;
    common::wait_until("the watcher's watch", || count(&fake, Verb::Watch) == 1).await;

    fake.expire_history();
    let resumed: Vec<_> = pods
        .watch(&kube::api::WatchParams::default().timeout(1), &old_rv)
        .await
        .expect("watch")
        .try_collect()
        .await
        .expect("events");
    let list = pods.list(&ListParams::default()).await.expect("list");
    fake.end_watches();
    let relisted = next_n(&mut events, 4).await;
    let fresh_rv = list.metadata.resource_version.expect("a list version");
    let from_fresh = pods.watch(&kube::api::WatchParams::default().timeout(1), &fresh_rv).await;

    assert_eq!(init, ["Init", "InitApply a", "InitDone"]);
    match resumed.first() {
        Some(WatchEvent::Error(status)) => assert_eq!(status.code, 410),
        other => panic!("expected 410 Gone, got {other:?}"),
    }
    assert!(fresh_rv.parse::<u64>().expect("numeric") > old_rv.parse::<u64>().expect("numeric"));
    assert_eq!(relisted, ["WatchError 410", "Init", "InitApply a", "InitDone"]);
    let events: Vec<_> = from_fresh.expect("watch").try_collect().await.expect("events");
    assert!(events.iter().all(|e| !matches!(e, WatchEvent::Error(_))), "{events:?}");
}

#[tokio::test]
async fn the_request_log_records_every_request_in_order_with_its_object() {
    let (fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let namespaces: Api<Namespace> = Api::all(client);
    fake.inject(Fault::status(500, "InternalError").verb(Verb::Delete));
    let before = fake.request_log().len();

    pods.create(&PostParams::default(), &pod("p", "nginx:1", "1")).await.expect("create");
    pods.get("p").await.expect("get");
    pods.list(&ListParams::default()).await.expect("list");
    let refused = pods.delete("p", &DeleteParams::default()).await;
    namespaces.get("default").await.expect("get the namespace");

    let log = fake.request_log();
    let records: Vec<_> = log[before..]
        .iter()
        .map(|r| (r.verb, r.kind, r.namespace.as_str(), r.name.as_str()))
        .collect();
    assert_eq!(
        records,
        [
            (Verb::Create, Some(Kind::Pod), NS, ""),
            (Verb::Get, Some(Kind::Pod), NS, "p"),
            (Verb::List, Some(Kind::Pod), NS, ""),
            (Verb::Delete, Some(Kind::Pod), NS, "p"),
            (Verb::Get, Some(Kind::Namespace), "", "default"),
        ]
    );
    assert!(log.windows(2).all(|w| w[0].at <= w[1].at));
    assert_eq!(api_status(refused).code, 500);
    assert_eq!(log[before..].iter().filter(|r| r.verb.is_write()).count(), 2);
    assert_eq!(fake.requests().total as usize, log.len());
}

#[tokio::test]
async fn clear_faults_removes_every_fault() {
    let (fake, client) = start(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    fake.inject(Fault::status(500, "InternalError").verb(Verb::List));
    fake.inject(Fault::status(503, "ServiceUnavailable"));

    let refused = pods.list(&ListParams::default()).await;
    fake.clear_faults();
    let served = pods.list(&ListParams::default()).await;

    assert_eq!(api_status(refused).code, 500, "the first matching fault applies");
    assert!(served.is_ok());
}
