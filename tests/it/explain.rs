//! `ExplainResource` (`GET /v1/resources/{id}:explain`): the cause named from the live
//! cluster (the fake API server's failing images, a node without a free GPU), from the
//! database without Kubernetes, or when the cluster stalls; over REST and gRPC; tenancy.

use std::time::{Duration, Instant};

use fake_kube::{FakeKube, Fault, Kind, Options, Verb};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use resource::pb::resource::v1::{
    ExplainResourceRequest, Explanation, resource_service_client::ResourceServiceClient,
};
use serde_json::{Value, json};
use tonic::{Code, Request};

use crate::{
    helpers::{AppOptions, TestApp, spawn_app, spawn_app_with},
    kube::{Cluster, NS, app_on, create, wait_status},
};

async fn app_with_cluster(opts: Options) -> (TestApp, Cluster) {
    let fake = FakeKube::start(opts).await.expect("start the fake API server");
    app_on(fake, None, &[]).await
}

/// `GET /v1/resources/{id}:explain`, which must answer 200.
async fn explain(app: &TestApp, id: &str) -> Value {
    let (status, body) = app.get_json(&format!("/v1/resources/{id}:explain")).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Explains `id` over REST until `done` holds (at most 10 s).
async fn explain_until(app: &TestApp, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let explanation = explain(app, id).await;
        if done(&explanation) {
            return explanation;
        }
        assert!(Instant::now() < deadline, "never explained as expected: {explanation}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn explain_grpc(app: &TestApp, id: &str) -> Explanation {
    let mut client = ResourceServiceClient::new(app.grpc_channel().await);
    let req = ExplainResourceRequest { instance_id: id.parse().unwrap() };
    client.explain_resource(req).await.expect("ExplainResource").into_inner()
}

fn events(explanation: &Value) -> &Vec<Value> {
    explanation["events"].as_array().expect("events")
}

fn has_event(explanation: &Value, kind: &str, reason: &str, text: &str) -> bool {
    events(explanation).iter().any(|e| {
        e["type"] == kind
            && e["reason"] == reason
            && e["message"].as_str().unwrap_or_default().contains(text)
    })
}

#[tokio::test]
async fn a_failing_image_is_explained_by_the_image_and_the_pods_events() {
    let opts = Options { failing_images: vec!["nope:1".into()], ..Options::default() };
    let (app, _cluster) = app_with_cluster(opts).await;
    let id = create(&app, "broken", 0, "nope:1", json!({})).await;

    let explanation = explain_until(&app, &id, |e| {
        e["summary"].as_str().unwrap_or_default().contains("nope:1")
            && has_event(e, "Warning", "Failed", "nope:1")
    })
    .await;

    let summary = explanation["summary"].as_str().unwrap();
    assert!(summary.starts_with(&format!("Instance {id} is ")), "{summary}");
    // CREATING (the Pod's waiting reason or the kubelet's event) or FAILED (the reason).
    let named = ["cannot pull image \"nope:1\"", "ErrImagePull", "ImagePullBackOff"];
    assert!(named.iter().any(|n| summary.contains(n)), "{summary}");
    assert_eq!(explanation["source"], "cluster");
    assert_eq!(explanation["resource"]["instance_id"], id.as_str());
    assert!(!explanation["conditions"].as_array().unwrap().is_empty(), "{explanation}");
    assert!(
        has_event(&explanation, "Warning", "Failed", "Failed to pull image \"nope:1\""),
        "{explanation}"
    );
    let event = &events(&explanation)[0];
    assert!(event["count"].as_i64().unwrap() >= 1 && event["last_seen"].is_string(), "{event}");

    let grpc = explain_grpc(&app, &id).await;
    assert!(grpc.summary.contains("nope:1"), "{}", grpc.summary);
    assert_eq!(grpc.source, "cluster");
    assert!(!grpc.conditions.is_empty());
    assert!(grpc.events.iter().any(|e| e.r#type == "Warning" && e.message.contains("nope:1")));
    assert_eq!(grpc.resource.unwrap().instance_id.to_string(), id);
}

#[tokio::test]
async fn a_gpu_no_node_has_free_is_named_with_the_schedulers_events() {
    let (app, _cluster) =
        app_with_cluster(Options { node_gpus: Some(0), ..Options::default() }).await;
    let id = create(&app, "a100", 2, "nginx:1.25", json!({})).await;

    let explanation = explain_until(&app, &id, |e| {
        e["summary"].as_str().unwrap_or_default().contains("Insufficient nvidia.com/gpu")
            && has_event(e, "Warning", "FailedScheduling", "Insufficient nvidia.com/gpu")
    })
    .await;

    let summary = explanation["summary"].as_str().unwrap();
    assert!(summary.contains("Unschedulable"), "{summary}");
    assert_eq!(explanation["source"], "cluster");
    let conditions = explanation["conditions"].as_array().unwrap();
    assert!(
        conditions.iter().any(|c| c["status"] == "False"
            && c["message"].as_str().unwrap_or_default().contains("Insufficient nvidia.com/gpu")),
        "{explanation}"
    );
    assert!(conditions.iter().all(|c| c["type"].is_string() && c["status"].is_string()));

    let grpc = explain_grpc(&app, &id).await;
    assert!(grpc.summary.contains("Insufficient nvidia.com/gpu"), "{}", grpc.summary);
    assert!(grpc.events.iter().any(|e| e.reason == "FailedScheduling"));
}

#[tokio::test]
async fn a_running_instance_is_explained_from_its_live_pod() {
    let (app, cluster) = app_with_cluster(Options::default()).await;
    let id = create(&app, "web", 0, "nginx:1.25", json!({})).await;
    wait_status(&app, &id, "RUNNING").await;

    let explanation = explain(&app, &id).await;

    assert_eq!(explanation["summary"], format!("Instance {id} is RUNNING as desired."));
    assert_eq!(explanation["source"], "cluster");
    let types: Vec<&str> = explanation["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    for kind in ["PodScheduled", "Initialized", "ContainersReady", "Ready", "ContainerRunning"] {
        assert!(types.contains(&kind), "{kind} in {types:?}");
    }
    assert!(has_event(&explanation, "Normal", "Started", "main"), "{explanation}");

    // A volume problem the kubelet reports is named, from the Pod's events.
    let pod = format!("inst-{id}");
    let message = "MountVolume.SetUp failed for volume \"data\" : secret \"data\" not found";
    cluster.fake.record_event(NS, &pod, "Warning", "FailedMount", message).expect("the pod");
    let pending = json!({"status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "True"},
        {"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
        "containerStatuses": [{"name": "main", "image": "nginx:1.25", "ready": false,
            "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]}});
    cluster.fake.patch_out_of_band(Kind::Pod, NS, &pod, pending).unwrap();

    let explanation = explain(&app, &id).await;
    assert_eq!(
        explanation["summary"],
        format!("Instance {id} is RUNNING: its volumes are not ready (FailedMount: {message}).")
    );
}

#[tokio::test]
async fn a_stalled_cluster_is_said_and_the_database_answers_in_time() {
    let (app, cluster) = app_with_cluster(Options::default()).await;
    let id = create(&app, "web", 0, "nginx:1.25", json!({})).await;
    wait_status(&app, &id, "RUNNING").await;
    cluster.fake.inject(Fault::hang().verb(Verb::Get).kind(Kind::Pod));
    cluster.fake.inject(Fault::hang().verb(Verb::List).kind(Kind::Event));

    let started = Instant::now();
    let explanation = explain(&app, &id).await;
    let elapsed = started.elapsed();

    // Half of server.http.timeout (1 s), not the 10 s call_timeout nor a 504.
    assert!(elapsed < Duration::from_millis(900), "answered after {elapsed:?}");
    assert_eq!(explanation["source"], "database");
    let summary = explanation["summary"].as_str().unwrap();
    assert_eq!(
        summary,
        format!(
            "Instance {id} is RUNNING as desired (the cluster did not answer within 500 ms; this is what the database says)."
        )
    );
    assert!(events(&explanation).is_empty());
    assert_eq!(explanation["conditions"][0]["type"], "Ready");
    assert_eq!(explanation["conditions"][0]["status"], "True");

    let started = Instant::now();
    let grpc = explain_grpc(&app, &id).await;
    assert!(started.elapsed() < Duration::from_millis(900));
    assert_eq!(grpc.source, "database");
    assert!(grpc.summary.contains("did not answer"), "{}", grpc.summary);
}

#[tokio::test]
async fn without_kubernetes_the_database_explains() {
    let app = spawn_app().await;
    let created = app
        .create_at(
            &app.http,
            &json!({"name": "db", "user_id": "u1",
                    "spec": {"cpu": 1, "memory": 256, "image": "nginx:1.25"}}),
        )
        .await;
    let id = created["instance_id"].as_str().unwrap().to_owned();

    let explanation = explain(&app, &id).await;

    assert_eq!(explanation["summary"], format!("Instance {id} is RUNNING as desired."));
    assert_eq!(explanation["source"], "database");
    assert_eq!(explanation["events"], json!([]));
    let ready = &explanation["conditions"][0];
    assert_eq!((ready["type"].as_str(), ready["status"].as_str()), (Some("Ready"), Some("True")));
    assert_eq!(ready["reason"], "RUNNING");
    assert!(ready["last_transition_time"].is_string(), "from updated_at: {ready}");

    let response = app.client.post(format!("{}/v1/resources/{id}:stop", app.http)).send().await;
    assert_eq!(response.unwrap().status(), 200);
    let explanation = explain(&app, &id).await;
    assert_eq!(explanation["summary"], format!("Instance {id} is STOPPED as requested."));
    assert_eq!(explanation["conditions"][0]["status"], "False");

    let grpc = explain_grpc(&app, &id).await;
    assert_eq!(grpc.source, "database");
    assert_eq!(grpc.summary, format!("Instance {id} is STOPPED as requested."));

    // Only GET reads an explanation; a bad id is 400, an unknown one 404.
    let post = app.client.post(format!("{}/v1/resources/{id}:explain", app.http)).send().await;
    let post = post.unwrap();
    assert_eq!(post.status(), 405);
    assert_eq!(post.headers()["allow"], "GET, HEAD");
    assert_eq!(app.get("/v1/resources/abc:explain").await.status(), 400);
    let (status, body) = app.get_json("/v1/resources/42:explain").await;
    assert_eq!((status, body["reason"].as_str()), (404, Some("INSTANCE_NOT_FOUND")));
}

const SECRET: &str = "test-only-hs256-secret-of-32-bytes+";

fn token(claims: Value) -> String {
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
}

#[tokio::test]
async fn another_user_cannot_explain_an_instance_but_its_owner_and_an_admin_can() {
    let env = vec![
        ("RESOURCE_AUTH__MODE".to_owned(), "jwt".to_owned()),
        ("RESOURCE_AUTH__JWT__SECRET".to_owned(), SECRET.to_owned()),
    ];
    let app = spawn_app_with(AppOptions { env, ..AppOptions::default() }).await;
    let exp = chrono::Utc::now().timestamp() + 300;
    let (owner, other) =
        (token(json!({"sub": "u1", "exp": exp})), token(json!({"sub": "u2", "exp": exp})));
    let admin = token(json!({"sub": "root", "role": "admin", "exp": exp}));
    let created = app
        .client
        .post(format!("{}/v1/resources", app.http))
        .bearer_auth(&owner)
        .json(&json!({"name": "mine", "spec": {"cpu": 1, "memory": 256, "image": "nginx:1.25"}}))
        .send()
        .await
        .unwrap();
    let created: Value = created.json().await.unwrap();
    let id = created["instance_id"].as_str().unwrap().to_owned();
    let rest = |token: String| {
        let url = format!("{}/v1/resources/{id}:explain", app.http);
        let request = app.client.get(url).bearer_auth(token);
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };

    let (status, body) = rest(other.clone()).await;
    assert_eq!((status, body["reason"].as_str()), (404, Some("INSTANCE_NOT_FOUND")), "{body}");
    assert_eq!(rest(owner.clone()).await.0, 200);
    assert_eq!(rest(admin).await.0, 200);
    let unauthenticated = app.get(&format!("/v1/resources/{id}:explain")).await;
    assert_eq!(unauthenticated.status(), 401);

    let mut client = ResourceServiceClient::new(app.grpc_channel().await);
    let ask = |token: &str| {
        let mut req = Request::new(ExplainResourceRequest { instance_id: id.parse().unwrap() });
        let value = format!("Bearer {token}").parse().unwrap();
        req.metadata_mut().insert("authorization", value);
        req
    };
    let refused = client.explain_resource(ask(&other)).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
    let mine = client.explain_resource(ask(&owner)).await.expect("the owner explains");
    assert_eq!(mine.into_inner().source, "database");
}
