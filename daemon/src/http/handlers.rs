//! Request handlers: parse, call the job manager, map errors.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use ferry_cluster::api::{DryRun, JobList, JobPhase, JobSummary, JobSummaryList, NodeList};
use ferry_cluster::spec::JobSpec;
use futures_util::StreamExt;
use serde::Deserialize;

use super::{ApiError, AppState};

type Result<T> = std::result::Result<T, ApiError>;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse> {
    if *state.ready.borrow() {
        Ok(HttpResponse::Ok()
            .content_type("text/plain")
            .body("ready\n"))
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Not ready",
            "the node is not registered in the store yet",
        ))
    }
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    // The cluster's nodes, read at scrape time (one store read per scrape).
    if let Ok(nodes) = state.jobs.nodes().await {
        state.metrics.set_nodes(&nodes);
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

pub async fn openapi(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(super::openapi::document(state.version))
}

/// No route: 405 with `Allow` for a known path asked with another method, 404 otherwise.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse> {
    use actix_web::ResponseError;
    if let Some(allow) = super::allowed_methods(req.path()) {
        let mut res = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            format!(
                "{} {} is not served; {} is",
                req.method(),
                req.path(),
                allow
            ),
        )
        .error_response();
        res.headers_mut().insert(
            actix_web::http::header::ALLOW,
            actix_web::http::header::HeaderValue::from_static(allow),
        );
        return Ok(res);
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "Not found",
        format!(
            "no route {} {}; see /openapi.json",
            req.method(),
            req.path()
        ),
    ))
}

/// The media types a job spec may come as (or none: YAML and JSON are told apart by
/// their text).
const SPEC_TYPES: &[&str] = &[
    "application/yaml",
    "application/x-yaml",
    "text/yaml",
    "text/x-yaml",
    "application/json",
    "text/plain",
];

/// How long a spec may take to parse.
const PARSE_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitQuery {
    /// Check only: run every check that can run before training, record nothing.
    #[serde(rename = "dryRun", default)]
    dry_run: bool,
}

/// The longest `Idempotency-Key` accepted.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// `POST /v1/jobs`: the body is the spec, YAML or JSON.
pub async fn submit(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<SubmitQuery>,
    mut body: web::Payload,
) -> Result<HttpResponse> {
    let idempotency_key = match req.headers().get("idempotency-key") {
        None => None,
        Some(v) => {
            let k = v
                .to_str()
                .ok()
                .map(|k| k.trim().trim_matches('"').to_string())
                .filter(|k| {
                    !k.is_empty()
                        && k.len() <= MAX_IDEMPOTENCY_KEY
                        && k.bytes().all(|b| b.is_ascii_graphic())
                });
            Some(k.ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "Bad request",
                    format!("Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} visible ASCII characters (a UUID, say)"),
                )
            })?)
        }
    };
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Payload too large",
            format!("a job spec may be at most {} bytes", state.max_body_bytes),
        )
    };
    let media = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .map(|v| {
            v.to_str()
                .unwrap_or("?")
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        });
    if let Some(m) = media.filter(|m| !SPEC_TYPES.contains(&m.as_str())) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported media type",
            format!(
                "a job spec comes as YAML or JSON ({}), not {m}",
                SPEC_TYPES.join(", ")
            ),
        ));
    }
    // A declared length beyond the limit is refused before a byte of it is read.
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_body_bytes as u64) {
        return Err(too_large());
    }
    let read = async {
        let mut buf = web::BytesMut::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "Bad request",
                    format!("cannot read the body: {e}"),
                )
            })?;
            if buf.len() + chunk.len() > state.max_body_bytes {
                return Err(too_large());
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf)
    };
    let buf = tokio::time::timeout(state.body_timeout, read)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "Request timeout",
                format!(
                    "the body did not arrive within {} ms (body_timeout_ms)",
                    state.body_timeout.as_millis()
                ),
            )
        })??;
    let text = String::from_utf8(buf.to_vec()).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "the body must be UTF-8 YAML or JSON",
        )
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "the body is empty; send the job spec as YAML or JSON",
        ));
    }
    // Parsed on a blocking thread, within a time budget: a spec never holds an API worker.
    let parse = web::block(move || JobSpec::parse(&text));
    let spec = match tokio::time::timeout(PARSE_BUDGET, parse).await {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "Bad request",
                format!(
                    "the spec took more than {} s to parse; send a plain job spec",
                    PARSE_BUDGET.as_secs()
                ),
            ))
        }
        Ok(Err(e)) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Service unavailable",
                format!("cannot parse now: {e}"),
            ))
        }
        Ok(Ok(r)) => r.map_err(|e| ApiError::from(crate::jobs::JobError::Invalid(e.0)))?,
    };
    let opts = crate::jobs::SubmitOptions {
        idempotency_key,
        dry_run: q.dry_run,
    };
    Ok(match state.jobs.submit(spec, opts).await? {
        crate::jobs::Submitted::Created(job) => HttpResponse::Created()
            .insert_header(("Location", format!("/v1/jobs/{}", job.id)))
            .insert_header(("ETag", etag(job.revision)))
            .json(job),
        crate::jobs::Submitted::Replayed(job) => HttpResponse::Ok()
            .insert_header(("Location", format!("/v1/jobs/{}", job.id)))
            .insert_header(("ETag", etag(job.revision)))
            .insert_header(("Idempotent-Replayed", "true"))
            .json(job),
        crate::jobs::Submitted::Checked(spec) => HttpResponse::Ok().json(DryRun {
            valid: true,
            spec: *spec,
        }),
    })
}

/// A record's entity tag: its store revision.
fn etag(revision: u64) -> String {
    format!("\"{revision}\"")
}

/// The revision an `If-Match` names (`"7"`, or `*` for any), if the header is there.
fn if_match(req: &HttpRequest) -> Result<Option<u64>> {
    let Some(v) = req.headers().get(actix_web::http::header::IF_MATCH) else {
        return Ok(None);
    };
    let v = v.to_str().unwrap_or("").trim();
    if v == "*" {
        return Ok(None);
    }
    v.trim_start_matches("W/")
        .trim_matches('"')
        .parse::<u64>()
        .map(Some)
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "Bad request",
                format!(
                    "If-Match `{v}` is not an ETag from this API (a quoted revision, e.g. \"42\")"
                ),
            )
        })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    phase: Option<String>,
    name: Option<String>,
    /// Jobs per page (1-1000); without it, every job.
    limit: Option<usize>,
    /// The `continue` token of the previous page.
    #[serde(rename = "continue")]
    cont: Option<String>,
    /// Labels the jobs must have: `k=v`, `k!=v`, `k` (has it), `!k` (has not), comma-separated.
    #[serde(rename = "labelSelector")]
    label_selector: Option<String>,
    /// `full` (the default: each job with its spec) or `summary` (without it).
    view: Option<String>,
}

/// One requirement of a label selector.
enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    Has(String),
    HasNot(String),
}

impl LabelReq {
    fn parse_all(text: &str) -> std::result::Result<Vec<LabelReq>, String> {
        text.split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| {
                let (req, key) = if let Some((k, v)) = t.split_once("!=") {
                    (LabelReq::Ne(k.trim().into(), v.trim().into()), k.trim())
                } else if let Some((k, v)) = t.split_once('=') {
                    let v = v.strip_prefix('=').unwrap_or(v);
                    (LabelReq::Eq(k.trim().into(), v.trim().into()), k.trim())
                } else if let Some(k) = t.strip_prefix('!') {
                    (LabelReq::HasNot(k.trim().into()), k.trim())
                } else {
                    (LabelReq::Has(t.into()), t)
                };
                ferry_cluster::spec::check_label_key(key)?;
                Ok(req)
            })
            .collect()
    }

    fn matches(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        match self {
            LabelReq::Eq(k, v) => labels.get(k) == Some(v),
            LabelReq::Ne(k, v) => labels.get(k) != Some(v),
            LabelReq::Has(k) => labels.contains_key(k),
            LabelReq::HasNot(k) => !labels.contains_key(k),
        }
    }
}

/// `GET /v1/jobs`: jobs in id order (ids grow with submission time), filtered by phase and
/// name, a page at a time with `limit`, each page's `continue` token leading to the next.
pub async fn list_jobs(
    state: web::Data<AppState>,
    q: web::Query<ListQuery>,
) -> Result<HttpResponse> {
    let bad = |detail: String| ApiError::new(StatusCode::BAD_REQUEST, "Bad request", detail);
    let phase = match q.phase.as_deref() {
        None => None,
        Some(p) => Some(
            JobPhase::ALL
                .into_iter()
                .find(|ph| ph.as_str().eq_ignore_ascii_case(p))
                .ok_or_else(|| {
                    bad(format!(
                        "phase `{p}` is not one of {}",
                        JobPhase::ALL.map(|ph| ph.as_str()).join(", ")
                    ))
                })?,
        ),
    };
    if q.limit.is_some_and(|l| !(1..=1000).contains(&l)) {
        return Err(bad("limit must be 1 to 1000".into()));
    }
    let after = match q.cont.as_deref() {
        None => None,
        Some(t) => Some(
            continue_token::decode(t)
                .ok_or_else(|| bad(format!("`{t}` is not a continue token from this API")))?,
        ),
    };
    let selector = LabelReq::parse_all(q.label_selector.as_deref().unwrap_or(""))
        .map_err(|e| bad(format!("labelSelector: {e}")))?;
    let summary = match q.view.as_deref() {
        None | Some("full") => false,
        Some("summary") => true,
        Some(v) => return Err(bad(format!("view `{v}` is not one of full, summary"))),
    };
    let mut jobs: Vec<_> = state
        .jobs
        .list()
        .await?
        .into_iter()
        .filter(|j| phase.is_none_or(|p| j.phase == p))
        .filter(|j| q.name.as_deref().is_none_or(|n| j.name == n))
        .filter(|j| selector.iter().all(|r| r.matches(&j.spec.labels)))
        .filter(|j| after.as_deref().is_none_or(|a| j.id.as_str() > a))
        .collect();
    jobs.sort_by(|a, b| a.id.cmp(&b.id));
    let mut cont = None;
    if let Some(limit) = q.limit {
        if jobs.len() > limit {
            jobs.truncate(limit);
            cont = jobs.last().map(|j| continue_token::encode(&j.id));
        }
    }
    if summary {
        let jobs = jobs.iter().map(JobSummary::from).collect();
        return Ok(HttpResponse::Ok().json(JobSummaryList { jobs, cont }));
    }
    Ok(HttpResponse::Ok().json(JobList { jobs, cont }))
}

/// `continue` tokens: opaque to clients (the last id of a page, hex-encoded).
mod continue_token {
    pub fn encode(id: &str) -> String {
        id.bytes().map(|b| format!("{b:02x}")).collect()
    }

    pub fn decode(token: &str) -> Option<String> {
        if !token.len().is_multiple_of(2) || token.len() > 256 {
            return None;
        }
        let bytes: Option<Vec<u8>> = (0..token.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
            .collect();
        String::from_utf8(bytes?).ok()
    }
}

/// `GET /v1/jobs/{id}`, with its revision as `ETag`; 304 for an `If-None-Match` that
/// names it (a poller reads the record only when it changed).
pub async fn get_job(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let job = state.jobs.get(&id).await?;
    let tag = etag(job.revision);
    let unchanged = req
        .headers()
        .get(actix_web::http::header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim() == "*" || t.trim().trim_start_matches("W/") == tag)
        });
    if unchanged {
        return Ok(HttpResponse::NotModified()
            .insert_header(("ETag", tag))
            .finish());
    }
    Ok(HttpResponse::Ok().insert_header(("ETag", tag)).json(job))
}

/// `DELETE /v1/jobs/{id}`: a job that has ended, with its events; the deleted record.
/// `If-Match` makes it conditional on the record's revision.
pub async fn delete_job(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let expected = if_match(&req)?;
    Ok(HttpResponse::Ok().json(state.jobs.delete(&id, expected).await?))
}

/// `POST /v1/jobs/{id}/cancel`; `If-Match` makes it conditional on the record's revision.
pub async fn cancel_job(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let expected = if_match(&req)?;
    let job = state.jobs.cancel(&id, expected).await?;
    Ok(HttpResponse::Accepted()
        .insert_header(("ETag", etag(job.revision)))
        .json(job))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    #[serde(default)]
    after: u64,
    /// Long-poll: seconds to wait for a new event (at most 60).
    #[serde(default)]
    wait: u64,
    /// Events per page (at most 10,000).
    #[serde(default = "default_event_limit")]
    limit: usize,
}

fn default_event_limit() -> usize {
    1000
}

pub async fn job_events(
    state: web::Data<AppState>,
    id: web::Path<String>,
    q: web::Query<EventsQuery>,
) -> Result<HttpResponse> {
    if q.wait > 60 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "wait may be at most 60 seconds; follow longer with successive requests",
        ));
    }
    if !(1..=10_000).contains(&q.limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "limit must be 1 to 10000",
        ));
    }
    let (wait, limit) = (Duration::from_secs(q.wait), q.limit);
    Ok(HttpResponse::Ok().json(state.jobs.events(&id, q.after, limit, wait).await?))
}

pub async fn list_nodes(state: web::Data<AppState>) -> Result<HttpResponse> {
    let nodes = state.jobs.nodes().await?;
    let coordinator = state.jobs.coordinator().await?;
    Ok(HttpResponse::Ok().json(NodeList { nodes, coordinator }))
}
