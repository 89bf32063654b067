//! The REST API (`/v1`), health, readiness, metrics and the OpenAPI document.
//! Handlers only parse, call one [`JobManager`] function and map errors to problems.

mod handlers;
pub mod openapi;
mod problem;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{Server, ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpServer, ResponseError};

use crate::jobs::JobManager;
use crate::metrics::Metrics;
pub use problem::ApiError;

/// What handlers share.
pub struct AppState {
    pub jobs: Arc<JobManager>,
    pub metrics: Metrics,
    /// The bearer token, if the API requires one.
    pub token: Option<String>,
    pub max_body_bytes: usize,
    /// Whether the node is registered and the store answers.
    pub ready: tokio::sync::watch::Receiver<bool>,
    pub version: &'static str,
}

/// Paths served without a token (probes).
const OPEN_PATHS: &[&str] = &["/healthz", "/readyz"];

/// Compares without an early exit, so response timing says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let state = req.app_data::<web::Data<AppState>>().cloned();
    if let Some(token) = state.as_ref().and_then(|s| s.token.clone()) {
        if !OPEN_PATHS.contains(&req.path()) {
            let given = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if !given.is_some_and(|g| constant_time_eq(g.trim().as_bytes(), token.as_bytes())) {
                let e = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "Unauthorized",
                    "this API needs `Authorization: Bearer <token>` (ferryctl: --token or FERRY_TOKEN)",
                );
                return Ok(req.into_response(e.error_response()).map_into_right_body());
            }
        }
    }
    next.call(req).await.map(|r| r.map_into_left_body())
}

async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let start = Instant::now();
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let method = req.method().to_string();
    // The events long-poll waits by design: its time says nothing about the API's latency.
    let long_poll = req.path().ends_with("/events")
        && req.query_string().split('&').any(|kv| {
            kv.strip_prefix("wait=")
                .is_some_and(|v| v.parse::<f64>().map_or(true, |w| w > 0.0))
        });
    let res = next.call(req).await?;
    if let Some(s) = state {
        let route = res
            .request()
            .match_pattern()
            .unwrap_or_else(|| "unmatched".into());
        s.metrics
            .http_requests
            .with_label_values(&[&method, &route, res.status().as_str()])
            .inc();
        if !long_poll {
            s.metrics
                .http_duration
                .with_label_values(&[&method, &route])
                .observe(start.elapsed().as_secs_f64());
        }
    }
    Ok(res)
}

/// Registers every route; `openapi::tests` checks this table against the OpenAPI document.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(handlers::healthz))
        .route("/readyz", web::get().to(handlers::readyz))
        .route("/metrics", web::get().to(handlers::metrics))
        .route("/openapi.json", web::get().to(handlers::openapi))
        .route("/v1/jobs", web::post().to(handlers::submit))
        .route("/v1/jobs", web::get().to(handlers::list_jobs))
        .route("/v1/jobs/{id}", web::get().to(handlers::get_job))
        .route("/v1/jobs/{id}/cancel", web::post().to(handlers::cancel_job))
        .route("/v1/jobs/{id}/events", web::get().to(handlers::job_events))
        .route("/v1/nodes", web::get().to(handlers::list_nodes));
}

/// Serves the API on an already-bound listener (tests bind port 0).
pub fn serve(listener: TcpListener, state: AppState) -> std::io::Result<Server> {
    let state = web::Data::new(state);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(web::QueryConfig::default().error_handler(|e, _| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "Bad request",
                    format!("bad query parameters: {e}"),
                )
                .into()
            }))
            .wrap(from_fn(auth))
            .wrap(from_fn(observe))
            .configure(routes)
            .default_service(web::to(handlers::not_found))
    })
    .workers(2)
    .shutdown_timeout(5)
    .listen(listener)?
    .run();
    Ok(server)
}
