//! Helpers shared by the test files that reach the fake through the real `kube` client.

#![allow(dead_code)] // Each test file uses a different subset.

use std::time::Duration;

use fake_kube::{FakeKube, Options};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::Status;
use kube::{Client, Config, ResourceExt};
use serde_json::json;

pub const NS: &str = "default";

/// A fake and a client reaching it through a kubeconfig, with `default` as namespace.
pub async fn start(opts: Options) -> (FakeKube, Client) {
    let fake = FakeKube::start(opts).await.expect("the fake binds a port");
    let kubeconfig = Kubeconfig::from_yaml(&fake.kubeconfig_yaml(NS)).expect("valid kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube reads the kubeconfig");
    (fake, Client::try_from(config).expect("kube builds a client"))
}

/// A one-container pod labelled `app=resource, instance={name}`.
pub fn pod(name: &str, image: &str, cpu: &str) -> Pod {
    serde_json::from_value(pod_json(name, image, cpu)).expect("a valid pod")
}

/// [`pod`] as JSON.
pub fn pod_json(name: &str, image: &str, cpu: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "resource", "instance": name}},
        "spec": {"containers": [{"name": "main", "image": image,
                                 "resources": {"limits": {"cpu": cpu}}}]},
    })
}

pub fn apply() -> PatchParams {
    PatchParams::apply("resource").force()
}

pub async fn apply_pod(pods: &Api<Pod>, pod: &Pod) -> Result<Pod, kube::Error> {
    pods.patch(&pod.name_any(), &apply(), &Patch::Apply(pod)).await
}

/// Polls `get` until `done` holds; fails the test after 5 s.
pub async fn wait_for<F: Fn(&Pod) -> bool>(pods: &Api<Pod>, name: &str, done: F) -> Pod {
    for _ in 0..500 {
        if let Some(pod) = pods.get_opt(name).await.expect("get works") {
            if done(&pod) {
                return pod;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("pod {name} did not reach the expected state");
}

/// Polls until `gone` holds; fails the test after 5 s.
pub async fn wait_until(what: &str, gone: impl Fn() -> bool) {
    for _ in 0..500 {
        if gone() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what} did not happen in time");
}

pub fn phase(pod: &Pod) -> &str {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or_default()
}

/// The `Status` of an API error; fails the test on success or another error.
pub fn api_status(result: Result<impl std::fmt::Debug, kube::Error>) -> Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Sends one raw HTTP/1.1 request and returns the status code, the head and the body.
pub async fn raw(fake: &FakeKube, head: &str, body: &str) -> (u16, String, serde_json::Value) {
    let (addr, request) = (
        fake.addr(),
        format!("{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()),
    );
    let response = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        stream.write_all(request.as_bytes()).expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("receive");
        response
    })
    .await
    .expect("the request ran");
    let code = response[9..12].parse().expect("a status code");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (code, head.to_string(), serde_json::from_str(body).unwrap_or_default())
}
