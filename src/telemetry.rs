//! Logs to stdout (text or JSON) and, with `log.otlp_endpoint`, spans over OTLP/HTTP.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::conf::{Log, LogFormat};

/// The installed subscriber's exporter; [`Telemetry::shutdown`] flushes it.
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the global subscriber: `RUST_LOG` or `log.level` filters, `log.format`
    /// formats, and spans go to `log.otlp_endpoint` when it is set.
    pub fn init(conf: &Log) -> Self {
        let filter = EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(&conf.level))
            .unwrap_or_else(|_| EnvFilter::new("info"));
        let traces = (!conf.otlp_endpoint.is_empty())
            .then(|| tracer_provider(&conf.otlp_endpoint))
            .flatten();
        let otel = traces
            .as_ref()
            .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("resource")));
        let registry = tracing_subscriber::registry().with(filter).with(otel);
        match conf.format {
            LogFormat::Json => registry.with(fmt::layer().json().flatten_event(true)).init(),
            // Colours for a terminal only: not in a container's log or a file.
            LogFormat::Text => {
                registry.with(fmt::layer().with_ansi(std::io::stdout().is_terminal())).init();
            }
        }
        if traces.is_some() {
            tracing::info!(endpoint = %conf.otlp_endpoint, "exporting traces over OTLP/HTTP");
        }
        Self { traces }
    }

    /// Exports the spans still buffered.
    pub fn shutdown(self) {
        if let Some(provider) = self.traces
            && let Err(e) = provider.shutdown()
        {
            eprintln!("resource: flushing traces failed: {e}");
        }
    }
}

fn tracer_provider(endpoint: &str) -> Option<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .build();
    match exporter {
        Ok(exporter) => Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(Resource::builder().with_service_name("resource").build())
                .build(),
        ),
        Err(e) => {
            eprintln!("resource: OTLP trace export disabled: {e}");
            None
        }
    }
}
