//! Kubernetes: the service against a fake API server (crates/fake-kube) that speaks the
//! real HTTP API, reached through the real `kube` client and a kubeconfig.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, Method, StatusCode, header},
    response::Response,
};
use fake_kube::{FakeKube, Kind, Options};
use serde_json::{Value, json};

use resource::pb::mq::v1::EventType;

use crate::{
    helpers::{AppOptions, TestApp, spawn_app_with},
    mq::{Broker, created, event},
    proxy::Proxy,
};

pub(crate) const NS: &str = "instances";

pub(crate) struct Cluster {
    pub(crate) fake: FakeKube,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// A kubeconfig (in the cluster's own directory) that reaches the API server through
    /// `via` (or directly), with [`NS`] as its namespace.
    pub(crate) fn kubeconfig(&self, via: Option<SocketAddr>) -> PathBuf {
        let name =
            via.map_or_else(|| "kubeconfig".to_owned(), |a| format!("kubeconfig-{}", a.port()));
        let path = self.dir.path().join(name);
        let mut yaml = self.fake.kubeconfig_yaml(NS);
        if let Some(via) = via {
            yaml = yaml.replace(&self.fake.url(), &format!("http://{via}"));
        }
        std::fs::write(&path, yaml).unwrap();
        path
    }
}

async fn app_with_cluster(opts: Options) -> (TestApp, Cluster) {
    let fake = FakeKube::start(opts).await.expect("start the fake API server");
    app_on(fake, None, &[]).await
}

/// The service against `fake`, reached through the proxy at `via` when given.
pub(crate) async fn app_on(
    fake: FakeKube,
    via: Option<SocketAddr>,
    extra_env: &[(&str, &str)],
) -> (TestApp, Cluster) {
    let cluster = Cluster { fake, dir: tempfile::tempdir().unwrap() };
    let kubeconfig = cluster.kubeconfig(via);
    let env = [
        ("RESOURCE_DATA__KUBERNETES__ENABLED", "true"),
        ("RESOURCE_DATA__KUBERNETES__KUBECONFIG", kubeconfig.to_str().unwrap()),
        ("RESOURCE_DATA__KUBERNETES__NAMESPACE", NS),
        ("RESOURCE_DATA__KUBERNETES__POLL_INTERVAL", "100ms"),
        ("RESOURCE_DATA__KUBERNETES__RESYNC_INTERVAL", "2s"),
        ("RESOURCE_DATA__KUBERNETES__API_QPS", "500"),
    ];
    let env = env.iter().chain(extra_env).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let app = spawn_app_with(AppOptions { env, ..AppOptions::default() }).await;
    (app, cluster)
}

/// An HTTP proxy in front of the API server that records each request it forwards, so
/// a test can tell which process made which call (the fake's own log cannot).
pub(crate) struct ApiRecorder {
    pub(crate) addr: SocketAddr,
    requests: Arc<Mutex<Vec<Forwarded>>>,
}

/// One request an [`ApiRecorder`] forwarded.
#[derive(Clone, Debug)]
pub(crate) struct Forwarded {
    /// When it arrived.
    pub(crate) at: std::time::Instant,
    pub(crate) method: Method,
    /// The path, without the query.
    pub(crate) path: String,
}

#[derive(Clone)]
struct Forward {
    target: SocketAddr,
    client: reqwest::Client,
    requests: Arc<Mutex<Vec<Forwarded>>>,
}

impl ApiRecorder {
    /// Listens on a free local port and forwards to the API server at `target`.
    pub(crate) async fn start(target: SocketAddr) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // Longer than any watch the service opens (`timeoutSeconds` below 5 minutes).
            .timeout(Duration::from_secs(600))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .unwrap();
        let requests = Arc::default();
        let state = Forward { target, client, requests: Arc::clone(&requests) };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().fallback(forward).with_state(state);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, requests }
    }

    /// Every request forwarded so far, oldest first.
    pub(crate) fn requests(&self) -> Vec<Forwarded> {
        self.requests.lock().unwrap().clone()
    }
}

/// `headers` without those of one hop (and the length, which the next hop sets again).
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let mut headers = headers.clone();
    for hop in [header::HOST, header::CONNECTION, header::CONTENT_LENGTH, header::TRANSFER_ENCODING]
    {
        headers.remove(hop);
    }
    headers
}

async fn forward(State(to): State<Forward>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let forwarded = Forwarded {
        at: std::time::Instant::now(),
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
    };
    to.requests.lock().unwrap().push(forwarded);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return Response::builder().status(StatusCode::BAD_REQUEST).body(Body::empty()).unwrap();
    };
    let sent = to
        .client
        .request(parts.method, format!("http://{}{path}", to.target))
        .headers(end_to_end(&parts.headers))
        .body(body)
        .send()
        .await;
    let Ok(answer) = sent else {
        return Response::builder().status(StatusCode::BAD_GATEWAY).body(Body::empty()).unwrap();
    };
    let mut response = Response::builder().status(answer.status());
    *response.headers_mut().unwrap() = end_to_end(answer.headers());
    // Streamed as it comes: watches are long-lived responses.
    let chunks = futures::stream::unfold(answer, |mut answer| async move {
        match answer.chunk().await {
            Ok(Some(chunk)) => Some((Ok(chunk), answer)),
            Ok(None) => None,
            Err(e) => Some((Err(e), answer)),
        }
    });
    response.body(Body::from_stream(chunks)).unwrap()
}

pub(crate) async fn call(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    let mut req = app.client.request(method, format!("{}{path}", app.http));
    if let Some(body) = body {
        req = req.json(&body);
    }
    let response = req.send().await.unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert!(status.is_success(), "{path}: {status} {body}");
    body
}

pub(crate) async fn create(
    app: &TestApp,
    name: &str,
    gpu: i32,
    image: &str,
    config: Value,
) -> String {
    let body = json!({"name": name, "user_id": "u1",
                      "spec": {"cpu": 2, "memory": 1024, "gpu": gpu, "image": image, "config_json": config}});
    let created = call(app, reqwest::Method::POST, "/v1/resources", Some(body)).await;
    assert_eq!(created["status"], "CREATING", "waits for the cluster: {created}");
    created["instance_id"].as_str().unwrap().to_owned()
}

/// Polls the instance until `done` holds (10 s at most).
pub(crate) async fn wait_for(
    app: &TestApp,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, instance) = app.get_json(&format!("/v1/resources/{id}")).await;
        if done(&instance) {
            return instance;
        }
        assert!(tokio::time::Instant::now() < deadline, "{id} never became {what}: {instance}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn wait_status(app: &TestApp, id: &str, status: &str) -> Value {
    wait_for(app, id, status, |i| i["status"] == status).await
}

pub(crate) fn pod(cluster: &Cluster, id: &str) -> Option<Value> {
    cluster.fake.get(Kind::Pod, NS, &format!("inst-{id}"))
}

pub(crate) async fn wait_pod_gone(cluster: &Cluster, id: &str) {
    for _ in 0..200 {
        if pod(cluster, id).is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("pod of {id} still exists: {:?}", pod(cluster, id));
}

#[tokio::test]
async fn cpu_and_gpu_instances_become_pods_and_services() {
    let (app, cluster) = app_with_cluster(Options::default()).await;
    let config = json!({"env": {"MODE": "web", "WORKERS": 4}, "command": ["/srv/app"], "args": ["--port", "8080"],
                        "ports": [{"name": "http", "port": 8080}]});
    let cpu = create(&app, "web", 0, "nginx:1.25", config).await;
    let gpu = create(&app, "train", 2, "pytorch/pytorch:2.3.0", json!({})).await;

    let running = wait_status(&app, &cpu, "RUNNING").await;
    let endpoint = &running["endpoint"];
    assert_eq!(endpoint["pod_name"], format!("inst-{cpu}"));
    assert!(endpoint["pod_ip"].as_str().unwrap().starts_with("10.244."), "{endpoint}");
    assert_eq!(endpoint["service_host"], format!("inst-{cpu}.{NS}.svc.cluster.local"));
    assert_eq!(endpoint["ports"], json!([{"name": "http", "port": 8080, "protocol": "TCP"}]));

    let p = pod(&cluster, &cpu).expect("the pod");
    assert_eq!(p["metadata"]["labels"]["app.kubernetes.io/managed-by"], "resource");
    assert_eq!(p["metadata"]["labels"]["resource.io/instance-id"], cpu);
    assert_eq!(p["metadata"]["labels"]["resource.io/owner"], "u1");
    assert_eq!(p["metadata"]["finalizers"], json!(["resource.io/instance-protection"]));
    let c = &p["spec"]["containers"][0];
    assert_eq!(c["image"], "nginx:1.25");
    assert_eq!(c["resources"]["requests"], json!({"cpu": "2", "memory": "1024Mi"}));
    assert_eq!(c["resources"]["limits"], json!({"cpu": "2", "memory": "1024Mi"}));
    assert_eq!(c["command"], json!(["/srv/app"]));
    assert_eq!(c["args"], json!(["--port", "8080"]));
    assert_eq!(
        c["env"],
        json!([{"name": "MODE", "value": "web"}, {"name": "WORKERS", "value": "4"}])
    );
    assert_eq!(c["ports"], json!([{"name": "http", "containerPort": 8080, "protocol": "TCP"}]));
    assert!(p["spec"].get("nodeSelector").is_none(), "no GPU, no node selector");
    let svc = cluster.fake.get(Kind::Service, NS, &format!("inst-{cpu}")).expect("the service");
    assert_eq!(svc["spec"]["selector"], json!({"resource.io/instance-id": cpu}));
    assert_eq!(svc["spec"]["ports"][0]["port"], 8080);

    wait_status(&app, &gpu, "RUNNING").await;
    let p = pod(&cluster, &gpu).expect("the GPU pod");
    let c = &p["spec"]["containers"][0];
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
    assert_eq!(p["spec"]["nodeSelector"], json!({"nvidia.com/gpu.product": "Tesla-A100"}));
    let svc = cluster.fake.get(Kind::Service, NS, &format!("inst-{gpu}")).expect("a service");
    assert_eq!(svc["spec"]["clusterIP"], "None", "no ports: headless");
}

#[tokio::test]
async fn an_instance_created_by_an_event_gets_its_network() {
    use prost::Message;
    let (app, cluster) = app_with_cluster(Options::default()).await;
    let broker = Broker::connect().await;
    let id = 78_001_i64;
    let name = format!("inst-{id}");
    let host = format!("{name}.{NS}.svc.cluster.local");

    // Events carry no ports.
    broker.publish_with_id(&app, &created(id), "net-1").await;
    let running = wait_status(&app, &id.to_string(), "RUNNING").await;

    let svc = cluster.fake.get(Kind::Service, NS, &name).expect("the instance's Service");
    assert_eq!(svc["spec"]["clusterIP"], "None", "headless: the name resolves to the Pod");
    assert_eq!(svc["spec"]["selector"], json!({"resource.io/instance-id": id.to_string()}));
    assert!(svc["spec"].get("ports").is_none_or(Value::is_null), "{svc}");
    let endpoint = &running["endpoint"];
    assert_eq!(endpoint["service_host"], host);
    assert_eq!(endpoint["pod_name"], name);
    assert!(endpoint["pod_ip"].as_str().is_some_and(|ip| !ip.is_empty()), "{endpoint}");
    let listed = call(&app, reqwest::Method::GET, "/v1/resources", None).await;
    assert_eq!(listed["resources"][0]["endpoint"], *endpoint, "the list shows the endpoint too");
    let mut running_event = None;
    while let Some(msg) = broker.get(&app.mq.status_queue, Duration::from_secs(10)).await {
        let change =
            resource::pb::mq::v1::InstanceStatusChanged::decode(msg.delivery.data.as_slice())
                .unwrap();
        if change.status == "RUNNING" {
            running_event = Some(change);
            break;
        }
    }
    let running_event = running_event.expect("a RUNNING status event");
    assert_eq!(running_event.endpoint, host, "the status event says where it runs");

    // Ports added later: the headless Service is replaced by one with the port (a
    // Service's clusterIP is immutable).
    let spec = json!({"config_json": {"ports": [{"name": "http", "port": 8080}]}});
    call(&app, reqwest::Method::PATCH, &format!("/v1/resources/{id}/spec"), Some(spec)).await;
    let resized = wait_for(&app, &id.to_string(), "the port in the endpoint", |i| {
        i["status"] == "RUNNING" && i["endpoint"]["ports"][0]["port"] == 8080
    })
    .await;
    assert_eq!(resized["endpoint"]["service_host"], host);
    let svc = cluster.fake.get(Kind::Service, NS, &name).expect("the Service");
    assert_ne!(svc["spec"]["clusterIP"], "None");
    assert_eq!(svc["spec"]["ports"][0]["port"], 8080);
    assert_eq!(
        pod(&cluster, &id.to_string()).unwrap()["spec"]["containers"][0]["image"],
        "ubuntu:22.04"
    );
}

#[tokio::test]
async fn the_whole_lifecycle_by_api_is_reflected_in_the_cluster() {
    let (app, cluster) = app_with_cluster(Options::default()).await;
    use reqwest::Method as M;
    let id = create(&app, "life", 0, "nginx:1.25", json!({"ports": [{"port": 80}]})).await;
    wait_status(&app, &id, "RUNNING").await;
    let first_uid = pod(&cluster, &id).unwrap()["metadata"]["uid"].clone();

    call(&app, M::POST, &format!("/v1/resources/{id}:stop"), None).await;
    let stopped = wait_status(&app, &id, "STOPPED").await;
    assert_eq!(stopped["endpoint"]["pod_ip"], "");
    wait_pod_gone(&cluster, &id).await;
    assert!(cluster.fake.get(Kind::Service, NS, &format!("inst-{id}")).is_none());

    call(&app, M::POST, &format!("/v1/resources/{id}:start"), None).await;
    wait_status(&app, &id, "RUNNING").await;

    // A resize replaces the Pod: the old one is gone before the new one runs.
    let spec = json!({"cpu": 4, "memory": 2048, "image": "nginx:1.26", "config_json": {"ports": [{"port": 80}]}});
    let changed = call(&app, M::PATCH, &format!("/v1/resources/{id}/spec"), Some(spec)).await;
    assert_eq!(changed["status"], "CREATING");
    wait_for(&app, &id, "RUNNING on the new spec", |i| {
        i["status"] == "RUNNING" && i["spec"]["cpu"] == 4
    })
    .await;
    let p = pod(&cluster, &id).unwrap();
    assert_ne!(p["metadata"]["uid"], first_uid, "a new pod");
    assert_eq!(p["spec"]["containers"][0]["resources"]["limits"]["cpu"], "4");
    assert_eq!(p["spec"]["containers"][0]["image"], "nginx:1.26");

    call(&app, M::DELETE, &format!("/v1/resources/{id}"), None).await;
    let deleted = wait_status(&app, &id, "DELETED").await;
    assert!(deleted["deleted_at"].is_string());
    wait_pod_gone(&cluster, &id).await;

    let trail =
        call(&app, M::GET, &format!("/v1/resources/{id}/audit-logs?page_size=100"), None).await;
    let moves: Vec<(String, String)> = trail["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["source"] == "reconciler")
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["after"]["status"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    // Newest first: DELETED, RUNNING (resized), RUNNING (started), STOPPED, RUNNING.
    let statuses: Vec<&str> = moves.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(statuses, ["DELETED", "RUNNING", "RUNNING", "STOPPED", "RUNNING"], "{trail}");
    assert!(moves.iter().all(|(a, _)| a == "STATUS_CHANGE"));
}

#[tokio::test]
async fn a_pod_deleted_behind_the_services_back_is_recreated() {
    let (app, cluster) = app_with_cluster(Options::default()).await;
    let id = create(&app, "victim", 0, "nginx:1.25", json!({})).await;
    wait_status(&app, &id, "RUNNING").await;
    let uid = pod(&cluster, &id).unwrap()["metadata"]["uid"].clone();

    assert!(cluster.fake.delete_out_of_band(Kind::Pod, NS, &format!("inst-{id}")));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(p) = pod(&cluster, &id)
            && p["metadata"]["uid"] != uid
            && p["status"]["phase"] == "Running"
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the pod was not recreated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_status(&app, &id, "RUNNING").await;
    let trail =
        call(&app, reqwest::Method::GET, &format!("/v1/resources/{id}/audit-logs"), None).await;
    let lost = trail["entries"].as_array().unwrap().iter().any(|e| {
        e["source"] == "reconciler"
            && e["after"]["status_reason"].as_str().unwrap_or("").contains("out of band")
    });
    assert!(lost, "the out-of-band deletion is on the trail: {trail}");
}

#[tokio::test]
async fn a_failing_image_ends_failed_with_the_reason() {
    let opts =
        Options { failing_images: vec!["nginx:does-not-exist".into()], ..Options::default() };
    let (app, _cluster) = app_with_cluster(opts).await;
    let id = create(&app, "broken", 0, "nginx:does-not-exist", json!({})).await;
    let failed = wait_status(&app, &id, "FAILED").await;
    let reason = failed["status_reason"].as_str().unwrap();
    assert!(
        reason.starts_with("ErrImagePull") || reason.starts_with("ImagePullBackOff"),
        "{reason}"
    );
}

#[tokio::test]
async fn two_replicas_on_one_database_never_handle_an_instance_twice() {
    // Each replica reaches the API server through a recorder of its own: who wrote what.
    let fake = FakeKube::start(Options::default()).await.expect("start the fake API server");
    let recorders = [ApiRecorder::start(fake.addr()).await, ApiRecorder::start(fake.addr()).await];
    let (app, cluster) = app_on(fake, Some(recorders[0].addr), &[]).await;
    let second_kubeconfig = cluster.kubeconfig(Some(recorders[1].addr));
    let second_kubeconfig = second_kubeconfig.to_str().unwrap();
    let _second =
        app.replica_with(&[("RESOURCE_DATA__KUBERNETES__KUBECONFIG", second_kubeconfig)]).await;
    let started = std::time::Instant::now();
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(create(&app, &format!("r{i}"), 0, "nginx:1.25", json!({})).await);
    }
    for id in &ids {
        wait_status(&app, id, "RUNNING").await;
    }
    assert_eq!(cluster.fake.list(Kind::Pod, NS).len(), 30);
    // One CREATING -> RUNNING per instance, whichever replica did it.
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_logs WHERE source = 'reconciler' AND after->>'status' = 'RUNNING'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(rows, 30);

    // Writes per replica, per instance: a Pod and a Service applied once each, by exactly
    // one replica; the two recorders saw every write the API server did.
    let mut per_replica = [0, 0];
    let (mut twice, mut miscounted) = (Vec::new(), Vec::new());
    for id in &ids {
        let ours = [
            format!("/api/v1/namespaces/{NS}/pods/inst-{id}"),
            format!("/api/v1/namespaces/{NS}/services/inst-{id}"),
        ];
        let by: Vec<Vec<String>> = recorders
            .iter()
            .map(|recorder| {
                let requests = recorder.requests();
                let writes = requests
                    .iter()
                    .filter(|r| is_write(&r.method) && ours.contains(&r.path))
                    .map(|r| {
                        let what = r.path.rsplit('/').nth(1).unwrap_or_default();
                        format!("{} {what} at {:?}", r.method, r.at.duration_since(started))
                    });
                writes.collect()
            })
            .collect();
        if by.iter().all(|writes| !writes.is_empty()) {
            twice.push(format!("{id}: first replica {:?}, second {:?}", by[0], by[1]));
        }
        if by[0].len() + by[1].len() != 2 {
            miscounted.push(format!("{id}: {by:?}"));
        }
        per_replica[0] += by[0].len();
        per_replica[1] += by[1].len();
    }
    assert!(
        twice.is_empty(),
        "{} of 30 instances were handled by both replicas:\n{}",
        twice.len(),
        twice.join("\n")
    );
    assert!(miscounted.is_empty(), "not one Pod and one Service apply each:\n{miscounted:#?}");
    assert_eq!(per_replica[0] + per_replica[1], 60, "writes per replica: {per_replica:?}");
    let served = cluster.fake.request_log();
    let instance_writes = served
        .iter()
        .filter(|r| {
            r.verb.is_write() && r.name.starts_with("inst-") && r.kind != Some(Kind::Namespace)
        })
        .count();
    assert_eq!(instance_writes, 60, "no write bypassed the recorders");
}

fn is_write(method: &Method) -> bool {
    [Method::POST, Method::PUT, Method::PATCH, Method::DELETE].contains(method)
}

#[tokio::test]
async fn the_lifecycle_by_events_is_reflected_in_the_cluster() {
    let (app, cluster) = app_with_cluster(Options::default()).await;
    let broker = Broker::connect().await;
    let id = 77_001_i64;
    broker.publish(&app, &created(id)).await;
    wait_status(&app, &id.to_string(), "RUNNING").await;
    assert!(pod(&cluster, &id.to_string()).is_some());

    broker.publish(&app, &event(EventType::InstanceStopped, id, 2)).await;
    wait_status(&app, &id.to_string(), "STOPPED").await;
    wait_pod_gone(&cluster, &id.to_string()).await;

    broker.publish(&app, &event(EventType::InstanceStarted, id, 3)).await;
    wait_status(&app, &id.to_string(), "RUNNING").await;

    broker.publish(&app, &event(EventType::InstanceDeleted, id, 4)).await;
    wait_status(&app, &id.to_string(), "DELETED").await;
    wait_pod_gone(&cluster, &id.to_string()).await;
}

#[tokio::test]
async fn an_api_server_outage_delays_but_loses_nothing() {
    let fake = FakeKube::start(Options::default()).await.unwrap();
    let proxy = Proxy::start(fake.addr()).await;
    let fast = [
        ("RESOURCE_DATA__KUBERNETES__RESYNC_INTERVAL", "1s"),
        ("RESOURCE_DATA__KUBERNETES__WATCH_RESTART", "1s"),
    ];
    let (app, cluster) = app_on(fake, Some(proxy.addr), &fast).await;

    proxy.cut();
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(create(&app, &format!("o{i}"), 0, "nginx:1.25", json!({})).await);
    }
    // Readiness follows the watch: it fails while the API server is away.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.get("/readyz").await.status() != 503 {
        assert!(tokio::time::Instant::now() < deadline, "readiness never noticed the outage");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, one) = app.get_json(&format!("/v1/resources/{}", ids[0])).await;
    assert_eq!(one["status"], "CREATING", "nothing can run without the cluster");

    proxy.restore();
    for id in &ids {
        wait_status(&app, id, "RUNNING").await;
    }
    assert_eq!(cluster.fake.list(Kind::Pod, NS).len(), 10);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.get("/readyz").await.status() != 200 {
        assert!(tokio::time::Instant::now() < deadline, "readiness never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn k8s_sync_restores_a_service_deleted_by_hand() {
    // A long resync: only the sync event can bring the Service back in time.
    let fake = FakeKube::start(Options::default()).await.unwrap();
    let (app, cluster) =
        app_on(fake, None, &[("RESOURCE_DATA__KUBERNETES__RESYNC_INTERVAL", "10m")]).await;
    let id = create(&app, "svc", 0, "nginx:1.25", json!({"ports": [{"port": 80}]})).await;
    wait_status(&app, &id, "RUNNING").await;
    let name = format!("inst-{id}");
    assert!(cluster.fake.delete_out_of_band(Kind::Service, NS, &name));

    let broker = Broker::connect().await;
    broker.publish(&app, &event(EventType::InstanceK8sSync, id.parse().unwrap(), 9)).await;
    for _ in 0..100 {
        if cluster.fake.get(Kind::Service, NS, &name).is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the service was not restored by INSTANCE_K8S_SYNC");
}
