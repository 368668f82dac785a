//! Every refusal is a documented error: malformed and oversized gRPC messages, paths
//! that are not UTF-8, request ids a client should not be able to store, and
//! configuration that cannot mean anything.

use std::marker::PhantomData;

use tonic::{
    Code,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
};
use tonic_types::StatusExt;

use crate::helpers::{BIN, grpc_endpoint, repo_path, run_to_end, spawn_app};

/// Sends and receives raw bytes, so a test can put anything on the wire.
#[derive(Default)]
struct RawCodec(PhantomData<()>);

struct Raw;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(buf);
        Ok(Some(bytes::Buf::copy_to_bytes(buf, n).to_vec()))
    }
}

/// A gRPC client that puts raw bytes on the wire.
pub(crate) async fn raw_client(grpc: &str) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = grpc_endpoint(grpc).connect().await.expect("connect gRPC");
    tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX)
}

/// Calls `path` with `body` as the message; the refusal it gets.
pub(crate) async fn raw_call(
    client: &mut tonic::client::Grpc<tonic::transport::Channel>,
    path: &str,
    body: Vec<u8>,
) -> tonic::Status {
    client.ready().await.unwrap();
    let path = PathAndQuery::try_from(path.to_owned()).unwrap();
    client.unary(tonic::Request::new(body), path, RawCodec::default()).await.expect_err("refused")
}

#[tokio::test]
async fn grpc_messages_that_do_not_decode_or_are_too_large_are_refused_with_error_info() {
    let app = spawn_app().await;
    let mut client = raw_client(&app.grpc).await;

    // A field 1 varint cut short, and a field of a wire type GetResourceRequest cannot hold.
    for garbage in [vec![0x08, 0xff], vec![0x0a, 0x05, 0x01]] {
        let status =
            raw_call(&mut client, "/resource.v1.resourceService/GetResource", garbage).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let info = status.get_error_details().error_info().cloned().expect("ErrorInfo");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("INVALID_ARGUMENT", "resource.v1")
        );
    }

    let oversized = vec![0u8; 5 << 20]; // above the 4 MiB default
    let status =
        raw_call(&mut client, "/resource.v1.resourceService/CreateResource", oversized).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let info = status.get_error_details().error_info().cloned().expect("ErrorInfo");
    assert_eq!(info.reason, "PAYLOAD_TOO_LARGE");
}

#[tokio::test]
async fn a_path_segment_that_is_not_utf8_is_the_json_400() {
    let app = spawn_app().await;
    for path in
        ["/v1/resources/%FF", "/v1/resources/%FF:stop", "/v1/resources/%FF/spec", "/helloworld/%FF"]
    {
        let method = if path.ends_with(":stop") {
            reqwest::Method::POST
        } else if path.ends_with("/spec") {
            reqwest::Method::PATCH
        } else {
            reqwest::Method::GET
        };
        let response = app
            .client
            .request(method, format!("{}{path}", app.http))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{path}");
        assert_eq!(response.headers()["content-type"], "application/json", "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["reason"], "INVALID_ARGUMENT", "{path}: {body}");
    }
}

#[tokio::test]
async fn an_overlong_request_id_is_replaced_not_stored_or_echoed() {
    let app = spawn_app().await;
    let long = "r".repeat(60 * 1024);
    let response = app
        .client
        .post(format!("{}/v1/resources", app.http))
        .header("x-request-id", &long)
        .json(&serde_json::json!({"name": "n", "user_id": "u", "spec": {"cpu": 1, "memory": 64, "image": "nginx"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echoed = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(echoed.len() <= 128 && echoed != long, "echoed {} bytes", echoed.len());

    // gRPC too, with an id just over the bound.
    let mut client =
        resource::pb::resource::v1::resource_service_client::ResourceServiceClient::new(
            app.grpc_channel().await,
        );
    let mut req = tonic::Request::new(resource::pb::resource::v1::CreateResourceRequest {
        name: "g".into(),
        user_id: "u".into(),
        spec: Some(resource::pb::resource::v1::ResourceSpec {
            cpu: 1,
            memory: 64,
            image: "nginx".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    req.metadata_mut().insert("x-request-id", "g".repeat(129).parse().unwrap());
    let reply = client.create_resource(req).await.unwrap();
    let echoed = reply.metadata().get("x-request-id").unwrap().to_str().unwrap();
    assert!(echoed.len() <= 128, "gRPC echoed {} bytes", echoed.len());

    let longest: i32 = sqlx::query_scalar("SELECT max(length(request_id)) FROM audit_logs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(longest <= 128, "an audit row stored a {longest}-character request id");
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_logs WHERE request_id = $1")
        .bind(echoed)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(kept, 1, "the replacement id is the one audited");
}

#[tokio::test]
async fn a_duration_out_of_range_exits_64_and_an_unknown_key_is_named() {
    let out = run_to_end(
        tokio::process::Command::new(BIN)
            .arg("-conf")
            .arg(repo_path("configs"))
            .arg("migrate")
            .env("RESOURCE_SERVER__HTTP__TIMEOUT", "9999999999999999h"),
    )
    .await;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("out of range") && stderr.contains("timeout"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Values every duration parser accepts, but PostgreSQL or a timestamp cannot hold.
    for (key, value) in [
        ("RESOURCE_DATA__RABBITMQ__DEDUP_WINDOW", "99999999999h"),
        ("RESOURCE_DATA__DATABASE__QUERY_TIMEOUT", "99999999h"),
    ] {
        let out = run_to_end(
            tokio::process::Command::new(BIN)
                .arg("-conf")
                .arg(repo_path("configs"))
                .arg("migrate")
                .env(key, value),
        )
        .await;
        assert_eq!(out.status.code(), Some(64), "{key}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("out of range") && !stderr.contains("panicked"), "{stderr}");
    }

    // A misspelt section is named at start-up (here the migrate command, which needs no
    // broker: it fails on the database, after the warning).
    let out = run_to_end(
        tokio::process::Command::new(BIN)
            .arg("-conf")
            .arg(repo_path("configs"))
            .arg("migrate")
            .env("RESOURCE_DATA__DATABSE__SOURCE", "postgres://nowhere")
            .env("RESOURCE_DATA__DATABASE__SOURCE", "postgres://postgres@127.0.0.1:1/none")
            .env("RESOURCE_DATA__DATABASE__CONNECT_TIMEOUT", "100ms")
            .env("RESOURCE_LOG__FORMAT", "json"),
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let warning = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"].as_str().is_some_and(|m| m.starts_with("unknown configuration key")))
        .unwrap_or_else(|| panic!("no warning naming the key in: {stdout}"));
    assert_eq!(warning["key"], "data.databse");
}
