//! The Prometheus exporter (`--metrics ADDR`).

use std::net::SocketAddr;

use anyhow::{Context, Result};

/// Serves `/metrics` on `addr` when given; metric macros are no-ops otherwise.
pub fn install(addr: Option<SocketAddr>) -> Result<()> {
    if let Some(addr) = addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!(%addr, "metrics endpoint up");
    }
    Ok(())
}
