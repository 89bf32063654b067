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
    pub body_timeout: std::time::Duration,
    pub max_connections: usize,
    pub max_requests_per_client: usize,
    /// Requests in flight by client address.
    pub in_flight: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
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

/// One request in flight from a client address; counted down when dropped.
struct InFlight {
    map: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Refuses a client's request beyond `max_requests_per_client` in flight (429): one client
/// cannot hold every connection and worker (slow bodies, piles of long-polls).
async fn per_client(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let (Some(state), Some(ip)) = (state, req.peer_addr().map(|a| a.ip())) else {
        return next.call(req).await.map(|r| r.map_into_left_body());
    };
    let admitted = {
        let mut m = state.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= state.max_requests_per_client && !OPEN_PATHS.contains(&req.path()) {
            false
        } else {
            *n += 1;
            true
        }
    };
    if !admitted {
        let e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many requests",
            format!(
                "{} requests from {ip} are in flight (max_requests_per_client); wait for some to finish",
                state.max_requests_per_client
            ),
        );
        return Ok(req.into_response(e.error_response()).map_into_right_body());
    }
    let _guard = InFlight {
        map: state.in_flight.clone(),
        ip,
    };
    next.call(req).await.map(|r| r.map_into_left_body())
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

/// Every route's path and the methods it answers (HEAD wherever GET); `routes` registers
/// them, and the default service answers a known path asked with another method with 405
/// and this `Allow`.
const ROUTE_METHODS: &[(&str, &str)] = &[
    ("/healthz", "GET, HEAD"),
    ("/readyz", "GET, HEAD"),
    ("/metrics", "GET, HEAD"),
    ("/openapi.json", "GET, HEAD"),
    ("/v1/jobs", "GET, HEAD, POST"),
    ("/v1/jobs/{id}", "GET, HEAD, DELETE"),
    ("/v1/jobs/{id}/cancel", "POST"),
    ("/v1/jobs/{id}/events", "GET, HEAD"),
    ("/v1/nodes", "GET, HEAD"),
];

/// The `Allow` value of the route `path` matches, if any (`{id}` matches one segment).
pub fn allowed_methods(path: &str) -> Option<&'static str> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    ROUTE_METHODS.iter().find_map(|(pattern, allow)| {
        let want: Vec<&str> = pattern.split('/').collect();
        (want.len() == segments.len()
            && want
                .iter()
                .zip(&segments)
                .all(|(w, s)| w == s || (*w == "{id}" && !s.is_empty())))
        .then_some(*allow)
    })
}

/// GET, and HEAD with the same handler (the server sends the head without the body).
fn get() -> actix_web::Route {
    use actix_web::guard;
    web::route().guard(guard::Any(guard::Get()).or(guard::Head()))
}

/// Registers every route; `openapi::tests` checks this table against the OpenAPI document.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", get().to(handlers::healthz))
        .route("/readyz", get().to(handlers::readyz))
        .route("/metrics", get().to(handlers::metrics))
        .route("/openapi.json", get().to(handlers::openapi))
        .route("/v1/jobs", web::post().to(handlers::submit))
        .route("/v1/jobs", get().to(handlers::list_jobs))
        .route("/v1/jobs/{id}", get().to(handlers::get_job))
        .route("/v1/jobs/{id}", web::delete().to(handlers::delete_job))
        .route("/v1/jobs/{id}/cancel", web::post().to(handlers::cancel_job))
        .route("/v1/jobs/{id}/events", get().to(handlers::job_events))
        .route("/v1/nodes", get().to(handlers::list_nodes));
}

/// Serves the API on an already-bound listener (tests bind port 0).
pub fn serve(listener: TcpListener, state: AppState) -> std::io::Result<Server> {
    let workers = 2;
    let max_connections = state.max_connections.div_ceil(workers).max(1);
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
            // gzip (or another coding) when the client accepts it; small bodies go as they are.
            .wrap(actix_web::middleware::Compress::default())
            .wrap(from_fn(auth))
            .wrap(from_fn(per_client))
            .wrap(from_fn(observe))
            .configure(routes)
            .default_service(web::to(handlers::not_found))
    })
    .workers(workers)
    // Bounded connections; a connection that sends no request head within 5 s is closed,
    // and an idle keep-alive one after 30 s.
    .max_connections(max_connections)
    .client_request_timeout(std::time::Duration::from_secs(5))
    .client_disconnect_timeout(std::time::Duration::from_secs(1))
    .keep_alive(std::time::Duration::from_secs(30))
    .shutdown_timeout(5)
    .listen(listener)?
    .run();
    Ok(server)
}
