//! The reconciler against a Kubernetes API server that misbehaves as real ones do (the
//! fake's fault injection plays the fault-injecting proxy): hung calls, 503/429 with
//! `Retry-After`, 403, 410 loops, dropped watches, objects changed by hand, a deleted
//! namespace.

use std::time::Duration;

use fake_kube::{FakeKube, Fault, Kind, Options, Verb};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::{
    helpers::TestApp,
    kube::{Cluster, NS, app_on, call, create, pod, wait_for, wait_pod_gone, wait_status},
};

/// The service against a fresh fake cluster, with `env` on top of the kube tests' own.
async fn start(env: &[(&str, &str)]) -> (TestApp, Cluster) {
    let fake = FakeKube::start(Options::default()).await.expect("start the fake API server");
    app_on(fake, None, env).await
}

/// Waits (at most `within`) until `check` holds, or fails saying `what`.
async fn eventually(within: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} (not within {within:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The instance's audit rows written by the reconciler, newest first.
async fn reconciler_trail(app: &TestApp, id: &str) -> Vec<Value> {
    let trail = call(
        app,
        reqwest::Method::GET,
        &format!("/v1/resources/{id}/audit-logs?page_size=100"),
        None,
    )
    .await;
    trail["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["source"] == "reconciler")
        .cloned()
        .collect()
}

/// Waits for a `K8S_SYNC` row by the reconciler whose reason contains `text`.
async fn wait_correction(app: &TestApp, id: &str, text: &str) -> Value {
    let mut found = None;
    eventually(
        Duration::from_secs(10),
        &format!("no audited correction {text:?} for {id}"),
        async || {
            found = reconciler_trail(app, id).await.into_iter().find(|e| {
                e["action"] == "K8S_SYNC" && e["reason"].as_str().unwrap_or("").contains(text)
            });
            found.is_some()
        },
    )
    .await;
    found.unwrap()
}

fn pod_requests(cluster: &Cluster, verb: Verb, name: &str) -> usize {
    let log = cluster.fake.request_log();
    log.iter().filter(|r| r.verb == verb && r.kind == Some(Kind::Pod) && r.name == name).count()
}

async fn ready(app: &TestApp) -> bool {
    app.get("/readyz").await.status() == 200
}

// === One bad call never stops the others ===

#[tokio::test]
async fn one_hung_pod_call_never_stops_the_others() {
    let (app, cluster) = start(&[("RESOURCE_DATA__KUBERNETES__CALL_TIMEOUT", "2s")]).await;
    // The first Pod write hangs: it is the first instance's.
    cluster.fake.inject(Fault::hang().verb(Verb::Patch).kind(Kind::Pod).times(1));
    let hung = create(&app, "hung", 0, "nginx:1.25", json!({})).await;
    let name = format!("inst-{hung}");
    eventually(Duration::from_secs(5), "the hung write was never sent", async || {
        pod_requests(&cluster, Verb::Patch, &name) == 1
    })
    .await;

    let started = Instant::now();
    let mut others = Vec::new();
    for i in 0..20 {
        others.push(create(&app, &format!("other-{i}"), 0, "nginx:1.25", json!({})).await);
    }
    for id in &others {
        wait_status(&app, id, "RUNNING").await;
    }
    // The call is bounded (2 s) and the others never waited for it.
    assert!(started.elapsed() < Duration::from_secs(4), "others took {:?}", started.elapsed());
    // The hung instance itself gets there once its call timed out.
    wait_status(&app, &hung, "RUNNING").await;
}

#[tokio::test]
async fn a_pod_answered_503_with_retry_after_backs_off_alone_and_says_why() {
    let (app, cluster) = start(&[]).await;
    // Every Pod write fails while the victim is created; then only the victim's do.
    let all = cluster.fake.inject(
        Fault::status(503, "ServiceUnavailable").retry_after(2).verb(Verb::Patch).kind(Kind::Pod),
    );
    let victim = create(&app, "victim", 0, "nginx:1.25", json!({})).await;
    let name = format!("inst-{victim}");
    let mine = cluster.fake.inject(
        Fault::status(503, "ServiceUnavailable")
            .retry_after(2)
            .verb(Verb::Patch)
            .kind(Kind::Pod)
            .name(&name),
    );
    cluster.fake.remove_fault(all);

    let mut others = Vec::new();
    for i in 0..10 {
        others.push(create(&app, &format!("other-{i}"), 0, "nginx:1.25", json!({})).await);
    }
    for id in &others {
        wait_status(&app, id, "RUNNING").await;
    }

    // The victim's tries honour Retry-After (2 s): no hidden retry layer behind them.
    let before = pod_requests(&cluster, Verb::Patch, &name);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let tries = pod_requests(&cluster, Verb::Patch, &name) - before;
    assert!((2..=5).contains(&tries), "{tries} tries in 8 s with Retry-After 2 s");
    let waiting = wait_for(&app, &victim, "told why it waits", |i| {
        i["status"] == "CREATING"
            && i["status_reason"].as_str().unwrap_or("").contains("unavailable")
    })
    .await;
    assert!(waiting["status_reason"].as_str().unwrap().contains("503"), "{waiting}");
    assert!(
        !waiting["status_reason"].as_str().unwrap().contains("Status {"),
        "no debug dump: {waiting}"
    );
    let logs = app.logs.lock().unwrap().join("\n");
    assert!(logs.contains("backing off"), "the backoff is logged");

    cluster.fake.remove_fault(mine);
    wait_status(&app, &victim, "RUNNING").await;
}

#[tokio::test]
async fn after_an_outage_everything_converges_within_twice_the_backoff_cap() {
    let cap = Duration::from_secs(3);
    let (app, cluster) = start(&[("RESOURCE_DATA__KUBERNETES__BACKOFF_MAX", "3s")]).await;
    let outage = cluster.fake.inject(Fault::status(503, "ServiceUnavailable"));
    cluster.fake.end_watches();
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(create(&app, &format!("o{i}"), 0, "nginx:1.25", json!({})).await);
    }
    eventually(Duration::from_secs(10), "readiness never noticed the outage", async || {
        !ready(&app).await
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;

    cluster.fake.remove_fault(outage);
    let healed = Instant::now();
    for id in &ids {
        wait_status(&app, id, "RUNNING").await;
    }
    let took = healed.elapsed();
    assert!(took <= cap * 2, "recovery took {took:?}, more than twice the cap {cap:?}");
    let recovered = Instant::now();
    let ok = tokio::time::timeout(Duration::from_secs(30), async {
        while !ready(&app).await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let body = app.get("/readyz").await.text().await.unwrap();
    let logs: Vec<String> = app.logs.lock().unwrap().iter().rev().take(30).cloned().collect();
    assert!(ok.is_ok(), "readiness never recovered: {body} {:?} {logs:#?}", recovered.elapsed());
}

// === Readiness tells the truth ===

#[tokio::test]
async fn readiness_flips_on_403_and_on_a_410_loop_and_recovers() {
    let (app, cluster) = start(&[]).await;
    let id = create(&app, "r", 0, "nginx:1.25", json!({})).await;
    wait_status(&app, &id, "RUNNING").await;
    assert!(ready(&app).await);

    let forbidden = cluster.fake.inject(Fault::status(403, "Forbidden").verb(Verb::Watch));
    cluster.fake.inject(Fault::status(403, "Forbidden").verb(Verb::List));
    cluster.fake.end_watches();
    eventually(Duration::from_secs(5), "ready through 403 Forbidden", async || !ready(&app).await)
        .await;
    cluster.fake.clear_faults();
    let _ = forbidden;
    eventually(Duration::from_secs(15), "not ready again after 403", async || ready(&app).await)
        .await;

    // Every re-watch expires at once: the watch never holds.
    cluster.fake.inject(Fault::status(410, "Expired").verb(Verb::Watch));
    cluster.fake.end_watches();
    eventually(Duration::from_secs(10), "ready through a 410 loop", async || !ready(&app).await)
        .await;
    cluster.fake.clear_faults();
    eventually(Duration::from_secs(20), "not ready again after the 410 loop", async || {
        ready(&app).await
    })
    .await;
}

// === What changed behind our back is put right, and audited ===

#[tokio::test]
async fn an_image_changed_by_hand_is_restored_and_audited() {
    let (app, cluster) = start(&[]).await;
    let id = create(&app, "img", 0, "nginx:1.25", json!({})).await;
    wait_status(&app, &id, "RUNNING").await;
    let name = format!("inst-{id}");
    let live = pod(&cluster, &id).unwrap();
    let patch = json!({"spec": {"containers": [{"name": "main", "image": "evil:latest",
        "resources": live["spec"]["containers"][0]["resources"]}]}});
    cluster.fake.patch_out_of_band(Kind::Pod, NS, &name, patch).unwrap();

    let row = wait_correction(&app, &id, "image was changed").await;
    assert!(row["reason"].as_str().unwrap().contains("evil:latest"), "{row}");
    eventually(Duration::from_secs(5), "the image was not restored", async || {
        pod(&cluster, &id).unwrap()["spec"]["containers"][0]["image"] == "nginx:1.25"
    })
    .await;
}

#[tokio::test]
async fn labels_and_the_finalizer_changed_by_hand_are_restored_and_audited() {
    let (app, cluster) = start(&[]).await;
    let id = create(&app, "meta", 0, "nginx:1.25", json!({})).await;
    wait_status(&app, &id, "RUNNING").await;
    let name = format!("inst-{id}");

    let patch = json!({"metadata": {"labels": {"resource.io/owner": "someone-else"}}});
    cluster.fake.patch_out_of_band(Kind::Pod, NS, &name, patch).unwrap();
    wait_correction(&app, &id, "labels or annotations").await;
    eventually(Duration::from_secs(5), "the label was not restored", async || {
        pod(&cluster, &id).unwrap()["metadata"]["labels"]["resource.io/owner"] == "u1"
    })
    .await;

    let patch = json!({"metadata": {"finalizers": null}});
    cluster.fake.patch_out_of_band(Kind::Pod, NS, &name, patch).unwrap();
    wait_correction(&app, &id, "finalizer was removed").await;
    eventually(Duration::from_secs(5), "the finalizer was not restored", async || {
        let finalizers = pod(&cluster, &id).unwrap()["metadata"]["finalizers"].clone();
        finalizers
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "resource.io/instance-protection"))
    })
    .await;
}

#[tokio::test]
async fn resources_changed_by_hand_replace_the_pod_and_are_audited() {
    let (app, cluster) = start(&[]).await;
    let id = create(&app, "res", 0, "nginx:1.25", json!({})).await;
    wait_status(&app, &id, "RUNNING").await;
    let name = format!("inst-{id}");
    let uid = pod(&cluster, &id).unwrap()["metadata"]["uid"].clone();
    let patch = json!({"spec": {"containers": [{"name": "main", "image": "nginx:1.25",
        "resources": {"limits": {"cpu": "16", "memory": "64Gi"}, "requests": {"cpu": "16", "memory": "64Gi"}}}]}});
    cluster.fake.patch_out_of_band(Kind::Pod, NS, &name, patch).unwrap();

    wait_correction(&app, &id, "resources differ").await;
    eventually(Duration::from_secs(10), "the pod was not replaced", async || {
        pod(&cluster, &id).is_some_and(|p| {
            p["metadata"]["uid"] != uid
                && p["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "2"
        })
    })
    .await;
    wait_status(&app, &id, "RUNNING").await;
}

#[tokio::test]
async fn a_service_deleted_by_hand_is_back_at_once_and_audited() {
    // A long resync: only the watch can bring the Service back in time.
    let (app, cluster) = start(&[("RESOURCE_DATA__KUBERNETES__RESYNC_INTERVAL", "10m")]).await;
    let id = create(&app, "svc", 0, "nginx:1.25", json!({"ports": [{"port": 80}]})).await;
    wait_status(&app, &id, "RUNNING").await;
    let name = format!("inst-{id}");
    assert!(cluster.fake.delete_out_of_band(Kind::Service, NS, &name));

    eventually(Duration::from_secs(3), "the Service was not restored", async || {
        cluster.fake.get(Kind::Service, NS, &name).is_some()
    })
    .await;
    wait_correction(&app, &id, "Service is missing").await;
}

#[tokio::test]
async fn stray_and_orphaned_pods_are_removed_logged_and_audited() {
    let (app, cluster) = start(&[("RESOURCE_DATA__KUBERNETES__RESYNC_INTERVAL", "1s")]).await;
    let id = create(&app, "owner", 0, "nginx:1.25", json!({})).await;
    wait_status(&app, &id, "RUNNING").await;

    // A Pod with our labels, not named as an instance's.
    let stray = json!({"metadata": {"name": "copy-of-it", "labels": {
            "app.kubernetes.io/managed-by": "resource", "resource.io/instance-id": id}},
        "spec": {"containers": [{"name": "main", "image": "nginx:1.25"}]}});
    cluster.fake.create_out_of_band(Kind::Pod, NS, stray).unwrap();
    eventually(Duration::from_secs(10), "the stray pod was not removed", async || {
        cluster.fake.get(Kind::Pod, NS, "copy-of-it").is_none()
    })
    .await;
    wait_correction(&app, &id, "removed stray Pod").await;
    // Someone else's Pod, without our label, is left alone.
    let theirs = json!({"metadata": {"name": "theirs"},
        "spec": {"containers": [{"name": "main", "image": "nginx:1.25"}]}});
    cluster.fake.create_out_of_band(Kind::Pod, NS, theirs).unwrap();

    // The workload of a deleted instance, brought back by someone else.
    call(&app, reqwest::Method::DELETE, &format!("/v1/resources/{id}"), None).await;
    wait_status(&app, &id, "DELETED").await;
    wait_pod_gone(&cluster, &id).await;
    let orphan = json!({"metadata": {"name": format!("inst-{id}"), "labels": {
            "app.kubernetes.io/managed-by": "resource", "resource.io/instance-id": id}},
        "spec": {"containers": [{"name": "main", "image": "nginx:1.25"}]}});
    cluster.fake.create_out_of_band(Kind::Pod, NS, orphan).unwrap();
    wait_pod_gone(&cluster, &id).await;
    wait_correction(&app, &id, "workload of a deleted instance").await;
    let logs = app.logs.lock().unwrap().join("\n");
    assert!(logs.contains("no instance's workload") && logs.contains("no longer exists"), "logged");
    assert!(cluster.fake.get(Kind::Pod, NS, "theirs").is_some(), "not ours: kept");
}

// === A deleted namespace ===

#[tokio::test]
async fn a_deleted_namespace_is_recreated_and_every_instance_runs_again() {
    let (app, cluster) = start(&[]).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(create(&app, &format!("n{i}"), 0, "nginx:1.25", json!({})).await);
    }
    for id in &ids {
        wait_status(&app, id, "RUNNING").await;
    }
    let uids: Vec<Value> =
        ids.iter().map(|id| pod(&cluster, id).unwrap()["metadata"]["uid"].clone()).collect();
    assert!(cluster.fake.delete_out_of_band(Kind::Namespace, "", NS));

    for (id, uid) in ids.iter().zip(&uids) {
        eventually(Duration::from_secs(20), "the instance did not run again", async || {
            pod(&cluster, id).is_some_and(|p| p["metadata"]["uid"] != *uid)
        })
        .await;
        wait_status(&app, id, "RUNNING").await;
        let lost = reconciler_trail(&app, id).await.into_iter().any(|e| {
            e["after"]["status"] == "CREATING"
                && e["after"]["status_reason"].as_str().unwrap_or("").contains("recreating")
        });
        assert!(lost, "the loss is on the trail of {id}");
    }
    let namespace = cluster.fake.get(Kind::Namespace, "", NS).expect("recreated");
    assert!(namespace["metadata"]["deletionTimestamp"].is_null());
    eventually(Duration::from_secs(10), "not ready after the namespace came back", async || {
        ready(&app).await
    })
    .await;
}

#[tokio::test]
async fn a_namespace_that_may_not_be_created_is_reported_in_readiness_and_reasons() {
    let fake = FakeKube::start(Options::default()).await.unwrap();
    // The namespace exists at start-up (made by an administrator), then is deleted.
    fake.ensure_namespace(NS);
    let (app, cluster) =
        app_on(fake, None, &[("RESOURCE_DATA__KUBERNETES__CREATE_NAMESPACE", "false")]).await;
    let id = create(&app, "nsless", 0, "nginx:1.25", json!({})).await;
    wait_status(&app, &id, "RUNNING").await;
    assert!(cluster.fake.delete_out_of_band(Kind::Namespace, "", NS));
    eventually(Duration::from_secs(15), "readiness says nothing of the namespace", async || {
        !ready(&app).await
    })
    .await;
    let body = app.get("/readyz").await.text().await.unwrap();
    assert!(body.contains("kubernetes"), "{body}");
    let waiting = wait_for(&app, &id, "told about the namespace", |i| {
        i["status"] == "CREATING" && i["status_reason"].as_str().unwrap_or("").contains("not found")
    })
    .await;
    assert!(waiting["status_reason"].as_str().unwrap().contains(NS), "{waiting}");
}

// === Reasons a user can act on ===

#[tokio::test]
async fn a_pod_held_by_another_controllers_finalizer_is_not_shown_running() {
    let (app, cluster) = start(&[]).await;
    let id = create(&app, "held", 0, "nginx:1.25", json!({})).await;
    wait_status(&app, &id, "RUNNING").await;
    let name = format!("inst-{id}");
    // Another controller holds it, our finalizer is taken off, and it is deleted.
    let patch = json!({"metadata": {"finalizers": ["other.io/hold"]}});
    cluster.fake.patch_out_of_band(Kind::Pod, NS, &name, patch).unwrap();
    assert!(cluster.fake.delete_out_of_band(Kind::Pod, NS, &name));

    // (Our finalizer is put back as soon as it is missed, so the deletion is seen as
    // out of band; what matters is that the reason names who holds the Pod.)
    wait_for(&app, &id, "shown as held", |i| {
        i["status"] == "CREATING"
            && i["status_reason"]
                .as_str()
                .unwrap_or("")
                .contains("held by finalizers: other.io/hold")
    })
    .await;
    // Released by its controller: the instance runs again.
    cluster
        .fake
        .patch_out_of_band(Kind::Pod, NS, &name, json!({"metadata": {"finalizers": null}}))
        .unwrap();
    wait_status(&app, &id, "RUNNING").await;
}

#[tokio::test]
async fn a_forbidden_write_shows_in_the_reason_and_passes_once_allowed() {
    let (app, cluster) = start(&[]).await;
    let denied = cluster.fake.inject(
        Fault::status(403, "Forbidden")
            .message("pods is forbidden: User \"system:serviceaccount:x:resource\" cannot patch resource \"pods\"")
            .verb(Verb::Patch)
            .kind(Kind::Pod),
    );
    let id = create(&app, "denied", 0, "nginx:1.25", json!({})).await;
    let waiting = wait_for(&app, &id, "told it is forbidden", |i| {
        i["status_reason"].as_str().unwrap_or("").contains("forbidden")
    })
    .await;
    assert_eq!(waiting["status"], "CREATING");
    // Reads still answer, but a cluster that refuses every write is not usable.
    eventually(Duration::from_secs(10), "ready while every write is refused", async || {
        !ready(&app).await
    })
    .await;
    for _ in 0..20 {
        assert!(!ready(&app).await, "readiness flapped back while writes are refused");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    cluster.fake.remove_fault(denied);
    wait_for(&app, &id, "RUNNING after the permission came", |i| i["status"] == "RUNNING").await;
    eventually(Duration::from_secs(10), "not ready after writes pass", async || ready(&app).await)
        .await;
}

// === Work proportional to change ===

// Several threads: the fake records when its handler runs, and on one thread it would
// be held up by the test's own polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_rest_no_request_is_made_per_instance_and_writes_keep_to_api_qps() {
    let qps = 20;
    let (app, cluster) = start(&[
        ("RESOURCE_DATA__KUBERNETES__API_QPS", "20"),
        ("RESOURCE_DATA__KUBERNETES__RESYNC_INTERVAL", "1s"),
    ])
    .await;
    let mut ids = Vec::new();
    for i in 0..60 {
        ids.push(create(&app, &format!("q{i}"), 0, "nginx:1.25", json!({})).await);
    }
    for id in &ids {
        wait_for(&app, id, "RUNNING", |i| i["status"] == "RUNNING").await;
    }
    // Bring-up wrote 2 objects per instance, spaced to api_qps in every second.
    let log = cluster.fake.request_log();
    let writes: Vec<std::time::Instant> =
        log.iter().filter(|r| r.verb.is_write()).map(|r| r.at).collect();
    let most = writes
        .iter()
        .map(|start| {
            writes.iter().filter(|t| **t >= *start && **t < *start + Duration::from_secs(1)).count()
        })
        .max()
        .unwrap_or(0);
    assert!(most <= qps, "{most} writes in one second with api_qps {qps}");
    let gets = log.iter().filter(|r| r.verb == Verb::Get && r.kind == Some(Kind::Pod)).count();
    assert_eq!(gets, 0, "pods are read from the cache");

    // At rest, through several resyncs: no request per instance.
    let settled = cluster.fake.request_log().len();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rest: Vec<_> = cluster.fake.request_log().into_iter().skip(settled).collect();
    let per_instance: Vec<_> =
        rest.iter().filter(|r| !r.name.is_empty() && r.kind != Some(Kind::Namespace)).collect();
    assert!(per_instance.is_empty(), "at rest: {per_instance:?}");
}

#[tokio::test]
async fn a_watch_that_hangs_is_noticed_and_replaced() {
    let (app, cluster) = start(&[("RESOURCE_DATA__KUBERNETES__WATCH_RESTART", "2s")]).await;
    let a = create(&app, "before", 0, "nginx:1.25", json!({})).await;
    wait_status(&app, &a, "RUNNING").await;
    // Every new watch request hangs; the open ones are cut.
    let hang = cluster.fake.inject(Fault::hang().verb(Verb::Watch));
    cluster.fake.end_watches();
    eventually(Duration::from_secs(15), "ready with every watch hung", async || !ready(&app).await)
        .await;
    // Lists still answer: what changes is seen at each relist, late but not never.
    let b = create(&app, "during", 0, "nginx:1.25", json!({})).await;
    wait_for(&app, &b, "RUNNING while watches hang", |i| i["status"] == "RUNNING").await;
    cluster.fake.remove_fault(hang);
    eventually(Duration::from_secs(30), "not ready again", async || ready(&app).await).await;
}

#[tokio::test]
async fn an_instance_label_or_spec_hash_edited_by_hand_is_restored_in_place() {
    let (app, cluster) = start(&[]).await;
    let id = create(&app, "inplace", 0, "nginx:1.25", json!({})).await;
    wait_status(&app, &id, "RUNNING").await;
    let name = format!("inst-{id}");
    let uid = pod(&cluster, &id).unwrap()["metadata"]["uid"].clone();

    let unlabel = json!({"metadata": {"labels": {"resource.io/instance-id": null}}});
    cluster.fake.patch_out_of_band(Kind::Pod, NS, &name, unlabel).unwrap();
    eventually(Duration::from_secs(10), "the instance label was not restored", async || {
        pod(&cluster, &id).unwrap()["metadata"]["labels"]["resource.io/instance-id"] == *id
    })
    .await;
    let rehash = json!({"metadata": {"annotations": {"resource.io/spec-hash": "deadbeef"}}});
    cluster.fake.patch_out_of_band(Kind::Pod, NS, &name, rehash).unwrap();
    eventually(Duration::from_secs(10), "the spec hash was not restored", async || {
        pod(&cluster, &id).unwrap()["metadata"]["annotations"]["resource.io/spec-hash"]
            != "deadbeef"
    })
    .await;

    assert_eq!(pod(&cluster, &id).unwrap()["metadata"]["uid"], uid, "never replaced");
    let audited = async || {
        let trail = reconciler_trail(&app, &id).await;
        trail.iter().filter(|e| e["action"] == "K8S_SYNC").count()
    };
    eventually(Duration::from_secs(5), "each edit is audited", async || audited().await >= 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(audited().await, 2, "each edit audited once");
    let trail = reconciler_trail(&app, &id).await;
    let why = trail.iter().filter(|e| e["action"] == "K8S_SYNC").map(|e| e["reason"].to_string());
    assert!(
        why.clone().all(|r| r.contains("labels or annotations")),
        "{:?}",
        why.collect::<Vec<_>>()
    );
    let (_, now) = app.get_json(&format!("/v1/resources/{id}")).await;
    assert_eq!(now["status"], "RUNNING", "no downtime: {now}");
}

#[tokio::test]
async fn a_correction_that_fails_is_retried_but_audited_once_and_keeps_the_service() {
    let (app, cluster) = start(&[("RESOURCE_DATA__KUBERNETES__BACKOFF_MAX", "1s")]).await;
    let id = create(&app, "retried", 0, "nginx:1.25", json!({"ports": [{"port": 80}]})).await;
    wait_status(&app, &id, "RUNNING").await;
    let name = format!("inst-{id}");
    let failing = cluster
        .fake
        .inject(Fault::status(500, "InternalError").verb(Verb::Patch).kind(Kind::Pod).name(&name));
    let live = pod(&cluster, &id).unwrap();
    let patch = json!({"spec": {"containers": [{"name": "main", "image": "evil:latest",
        "resources": live["spec"]["containers"][0]["resources"],
        "ports": live["spec"]["containers"][0]["ports"]}]}});
    cluster.fake.patch_out_of_band(Kind::Pod, NS, &name, patch).unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(pod_requests(&cluster, Verb::Patch, &name) >= 2, "the correction is retried");
    assert!(cluster.fake.get(Kind::Service, NS, &name).is_some(), "the Service is kept");
    cluster.fake.remove_fault(failing);

    wait_correction(&app, &id, "image was changed").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows =
        reconciler_trail(&app, &id).await.into_iter().filter(|e| e["action"] == "K8S_SYNC").count();
    assert_eq!(rows, 1, "audited once, when done");
}

#[tokio::test]
async fn a_huge_retry_after_does_not_hold_a_users_delete() {
    let (app, cluster) = start(&[("RESOURCE_DATA__KUBERNETES__BACKOFF_MAX", "2s")]).await;
    cluster.fake.inject(
        Fault::status(429, "TooManyRequests")
            .retry_after(300)
            .verb(Verb::Patch)
            .kind(Kind::Pod)
            .times(1),
    );
    let id = create(&app, "throttled", 0, "nginx:1.25", json!({})).await;
    let name = format!("inst-{id}");
    eventually(Duration::from_secs(5), "the throttled write was never sent", async || {
        pod_requests(&cluster, Verb::Patch, &name) >= 1
    })
    .await;
    // Retry-After 300 s is capped by backoff_max: the create goes on.
    wait_for(&app, &id, "RUNNING within the cap", |i| i["status"] == "RUNNING").await;
    call(&app, reqwest::Method::DELETE, &format!("/v1/resources/{id}"), None).await;
    wait_status(&app, &id, "DELETED").await;
}
