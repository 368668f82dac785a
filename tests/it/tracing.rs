//! OpenTelemetry: with `log.otlp_endpoint` set, spans reach an OTLP/HTTP collector (a
//! small in-test one that decodes the real OTLP protobuf).

use std::sync::{Arc, Mutex};

use axum::{Router, body::Bytes, extract::State, routing::post};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

use crate::helpers::{AppOptions, spawn_app_with};

type Spans = Arc<Mutex<Vec<(String, String)>>>;

/// Records (service.name, span name) of every span exported to it.
async fn collector() -> (String, Spans) {
    async fn export(State(spans): State<Spans>, body: Bytes) -> &'static str {
        let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
        for resource_spans in request.resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.lock().unwrap().push((service.clone(), span.name));
                }
            }
        }
        ""
    }
    let spans: Spans = Arc::default();
    let app = Router::new().route("/v1/traces", post(export)).with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), spans)
}

#[tokio::test]
async fn spans_are_exported_over_otlp_when_an_endpoint_is_configured() {
    let (endpoint, spans) = collector().await;
    let mut app = spawn_app_with(AppOptions {
        env: vec![("RESOURCE_LOG__OTLP_ENDPOINT".into(), endpoint)],
        ..Default::default()
    })
    .await;
    assert_eq!(app.get("/v1/resources").await.status(), 200);
    // Exit flushes the batch.
    assert!(app.terminate().await.success());

    let spans = spans.lock().unwrap().clone();
    let http: Vec<_> = spans.iter().filter(|(_, name)| name == "http").collect();
    assert!(!http.is_empty(), "the request's span was exported: {spans:?}");
    assert!(http.iter().all(|(service, _)| service.contains("resource")), "{http:?}");
}
