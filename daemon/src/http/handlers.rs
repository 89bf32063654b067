//! Request handlers: parse, call the job manager, map errors.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use ferry_cluster::api::{
    DryRun, EventPage, Job, JobList, JobPhase, JobSummary, JobSummaryList, NodeList, Problem,
};
use ferry_cluster::spec::JobSpec;
use futures_util::StreamExt;
use serde::Deserialize;

use super::{ApiError, AppState};

type Result<T> = std::result::Result<T, ApiError>;

#[utoipa::path(get, path = "/healthz", operation_id = "healthz", summary = "Liveness", security(()),
    responses((status = 200, description = "The process is up", body = String, content_type = "text/plain")))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

#[utoipa::path(get, path = "/readyz", operation_id = "readyz", summary = "Readiness: the node is registered in the store", security(()),
    responses((status = 200, description = "Ready", body = String, content_type = "text/plain"), (status = 503, description = "Not registered yet", body = Problem, content_type = "application/problem+json")))]
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

#[utoipa::path(get, path = "/metrics", operation_id = "metrics", summary = "Prometheus metrics",
    responses((status = 200, description = "Text exposition format", body = String, content_type = "text/plain"), (status = 401, description = "No or a wrong bearer token", body = Problem, content_type = "application/problem+json")))]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    // The cluster's nodes, read at scrape time (one store read per scrape).
    if let Ok(nodes) = state.jobs.nodes().await {
        state.metrics.set_nodes(&nodes);
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

#[utoipa::path(get, path = "/openapi.json", operation_id = "openapi", summary = "This document",
    responses((status = 200, description = "The OpenAPI document", body = Object), (status = 401, description = "No or a wrong bearer token", body = Problem, content_type = "application/problem+json")))]
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

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SubmitQuery {
    /// Check only: run every check that can run before training, record nothing.
    #[serde(rename = "dryRun", default)]
    dry_run: bool,
}

/// The longest `Idempotency-Key` accepted.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// `POST /v1/jobs`: the body is the spec, YAML or JSON.
#[utoipa::path(post, path = "/v1/jobs", operation_id = "submitJob", summary = "Submit a job (or check it: dryRun)",
    description = "A job's model is code: submitting a TorchScript model runs it as ferryd's user (or rank_user) on the nodes the job is placed on, confined by rank_sandbox where it applies (docs/security.md). Names are unique among jobs that have not ended. With Idempotency-Key, the same key and spec within a day return the first job (200, Idempotent-Replayed: true).",
    params(SubmitQuery, ("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$", description = "1-255 visible ASCII characters; the same key and spec make one job")),
    request_body(description = "The job spec (v1) as JSON, or the same document as YAML (application/yaml, text/yaml; not listed here because YAML reads a number or a boolean where a string goes as its text, which JSON Schema calls a wrong type)", content(
        (JobSpec = "application/json"))),
    responses(
        (status = 201, description = "The job, Pending", body = Job,
            headers(("Location" = String, description = "The job's URL"), ("ETag" = String, description = "The record's revision"))),
        (status = 200, description = "A replay of the job this Idempotency-Key made, or a dry run that passed", body = Job),
        (status = 400, description = "An empty body, or a bad query or header", body = Problem, content_type = "application/problem+json"), (status = 401, description = "No or a wrong bearer token", body = Problem, content_type = "application/problem+json"), (status = 408, description = "The body arrived too slowly", body = Problem, content_type = "application/problem+json"), (status = 409, description = "The name or output dir is in use by a job that has not ended", body = Problem, content_type = "application/problem+json"), (status = 413, description = "The body is too large", body = Problem, content_type = "application/problem+json"), (status = 415, description = "Not YAML or JSON", body = Problem, content_type = "application/problem+json"), (status = 422, description = "An invalid spec (every field in error), or an Idempotency-Key reused with another spec", body = Problem, content_type = "application/problem+json"), (status = 429, description = "The queue is full, or too many requests in flight", body = Problem, content_type = "application/problem+json"), (status = 503, description = "The store is unavailable", body = Problem, content_type = "application/problem+json")))]
pub async fn submit(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<SubmitQuery>,
    mut body: web::Payload,
) -> Result<HttpResponse> {
    let idempotency_key = match req.headers().get("idempotency-key") {
        None => None,
        Some(v) => {
            let k = v.to_str().ok().map(|k| k.trim().to_string()).filter(|k| {
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
    let v = v.to_str().unwrap_or("?");
    // `*` (any revision) and an empty field are no condition.
    if v == "*" || v.is_empty() {
        return Ok(None);
    }
    revision_of(v, false).map(Some).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "Bad request",
            format!("If-Match `{v}` is not an ETag from this API (a quoted revision, e.g. \"42\")"),
        )
    })
}

/// The revision in an entity tag of ours: `"42"` (or `W/"42"` where a weak one will do).
fn revision_of(tag: &str, weak_ok: bool) -> Option<u64> {
    let tag = match tag.strip_prefix("W/") {
        Some(t) if weak_ok => t,
        Some(_) => return None,
        None => tag,
    };
    let digits = tag.strip_prefix('"')?.strip_suffix('"')?;
    if digits.is_empty() || digits.len() > 19 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Whether `If-None-Match` names revision `revision` (`*`, or a list of our tags); a value
/// that is neither is refused.
fn none_match_hits(req: &HttpRequest, revision: u64) -> Result<bool> {
    let Some(v) = req.headers().get(actix_web::http::header::IF_NONE_MATCH) else {
        return Ok(false);
    };
    let v = v.to_str().unwrap_or("?");
    if v == "*" {
        return Ok(true);
    }
    if v.is_empty() {
        return Ok(false);
    }
    let tags: Option<Vec<u64>> = v
        .split(',')
        .map(|t| revision_of(t.trim_start_matches(' '), true))
        .collect();
    let tags = tags.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "Bad request",
            format!("If-None-Match `{v}` is not `*` or a list of ETags from this API (quoted revisions, e.g. \"42\")"),
        )
    })?;
    Ok(tags.contains(&revision))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only jobs in this phase (any case).
    #[param(value_type = Option<JobPhase>)]
    phase: Option<String>,
    /// Only jobs of this name.
    name: Option<String>,
    /// Jobs per page (1-1000); without it, every job.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The `continue` token of the previous page (opaque).
    #[serde(rename = "continue")]
    #[param(pattern = "^([0-9a-f]{2}){1,128}$")]
    cont: Option<String>,
    /// Labels the jobs must have: `k=v`, `k!=v`, `k` (has it), `!k` (has not), comma-separated.
    #[serde(rename = "labelSelector")]
    #[param(
        pattern = "^((!([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?){0,2}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?|([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?){0,2}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?((!=|==|=)([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?)?)(,(!([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?){0,2}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?|([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?){0,2}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?((!=|==|=)([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?)?))*)?$"
    )]
    label_selector: Option<String>,
    /// `full` (the default: each job with its spec) or `summary` (without it).
    #[param(pattern = "^(full|summary)$")]
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
        if text.is_empty() {
            return Ok(Vec::new());
        }
        text.split(',')
            .map(|t| {
                if t.is_empty() || t.chars().any(char::is_whitespace) {
                    return Err(format!(
                        "`{t}` is not a requirement (`k=v`, `k!=v`, `k`, `!k`; no spaces)"
                    ));
                }
                let (req, key, value) = if let Some((k, v)) = t.split_once("!=") {
                    (LabelReq::Ne(k.into(), v.into()), k, Some(v))
                } else if let Some((k, v)) = t.split_once('=') {
                    let v = v.strip_prefix('=').unwrap_or(v);
                    (LabelReq::Eq(k.into(), v.into()), k, Some(v))
                } else if let Some(k) = t.strip_prefix('!') {
                    (LabelReq::HasNot(k.into()), k, None)
                } else {
                    (LabelReq::Has(t.into()), t, None)
                };
                ferry_cluster::spec::check_label_key(key)?;
                if let Some(v) = value {
                    ferry_cluster::spec::check_label_value(v)?;
                }
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
#[utoipa::path(get, path = "/v1/jobs", operation_id = "listJobs", summary = "List jobs, oldest first (by id, which grows with submission time)",
    params(ListQuery),
    responses((status = 200, description = "Jobs (view=summary: JobSummaryList)", body = JobList), (status = 400, description = "A bad query", body = Problem, content_type = "application/problem+json"), (status = 401, description = "No or a wrong bearer token", body = Problem, content_type = "application/problem+json"), (status = 503, description = "The store is unavailable", body = Problem, content_type = "application/problem+json")))]
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
        if token.is_empty() || !token.len().is_multiple_of(2) || token.len() > 256 {
            return None;
        }
        let bytes: Option<Vec<u8>> = (0..token.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
            .collect();
        // Any position is a place to go on from (ids are ASCII).
        Some(String::from_utf8_lossy(&bytes?).into_owned())
    }
}

/// `GET /v1/jobs/{id}`, with its revision as `ETag`; 304 for an `If-None-Match` that
/// names it (a poller reads the record only when it changed).
#[utoipa::path(get, path = "/v1/jobs/{id}", operation_id = "getJob", summary = "One job",
    params(("id" = String, Path, description = "A job id, or a job name (the job of that name that has not ended, else the newest)"), ("If-None-Match" = Option<String>, Header, pattern = "^(\\*|(W/)?\"[0-9]{1,19}\"(, *(W/)?\"[0-9]{1,19}\")*)$", description = "ETags: 304 while the record is at one of these revisions")),
    responses((status = 200, description = "The job", body = Job, headers(("ETag" = String, description = "The record's revision"))),
        (status = 304, description = "Unchanged since the If-None-Match revision"), (status = 400, description = "A malformed If-None-Match", body = Problem, content_type = "application/problem+json"), (status = 401, description = "No or a wrong bearer token", body = Problem, content_type = "application/problem+json"), (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"), (status = 503, description = "The store is unavailable", body = Problem, content_type = "application/problem+json")))]
pub async fn get_job(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let job = state.jobs.get(&id).await?;
    let tag = etag(job.revision);
    if none_match_hits(&req, job.revision)? {
        return Ok(HttpResponse::NotModified()
            .insert_header(("ETag", tag))
            .finish());
    }
    Ok(HttpResponse::Ok().insert_header(("ETag", tag)).json(job))
}

/// `DELETE /v1/jobs/{id}`: a job that has ended, with its events; the deleted record.
/// `If-Match` makes it conditional on the record's revision.
#[utoipa::path(delete, path = "/v1/jobs/{id}", operation_id = "deleteJob", summary = "Delete a job that has ended, with its events (its outputs stay)",
    params(("id" = String, Path, description = "A job id, or a job name (the job of that name that has not ended, else the newest)"), ("If-Match" = Option<String>, Header, pattern = "^(\\*|\"[0-9]{1,19}\")$", description = "An ETag: only while the record is at that revision, else 412")),
    responses((status = 200, description = "The deleted job", body = Job), (status = 400, description = "A malformed If-Match", body = Problem, content_type = "application/problem+json"), (status = 401, description = "No or a wrong bearer token", body = Problem, content_type = "application/problem+json"), (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"), (status = 409, description = "The job has not ended", body = Problem, content_type = "application/problem+json"), (status = 412, description = "The record is at another revision", body = Problem, content_type = "application/problem+json"), (status = 503, description = "The store is unavailable", body = Problem, content_type = "application/problem+json")))]
pub async fn delete_job(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let expected = if_match(&req)?;
    Ok(HttpResponse::Ok().json(state.jobs.delete(&id, expected).await?))
}

/// `POST /v1/jobs/{id}/cancel`; `If-Match` makes it conditional on the record's revision.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", operation_id = "cancelJob", summary = "Cancel a job",
    params(("id" = String, Path, description = "A job id, or a job name (the job of that name that has not ended, else the newest)"), ("If-Match" = Option<String>, Header, pattern = "^(\\*|\"[0-9]{1,19}\")$", description = "An ETag: only while the record is at that revision, else 412")),
    responses((status = 202, description = "Cancellation requested (or done, for a Pending job)", body = Job), (status = 400, description = "A malformed If-Match", body = Problem, content_type = "application/problem+json"), (status = 401, description = "No or a wrong bearer token", body = Problem, content_type = "application/problem+json"), (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"), (status = 409, description = "The job has ended", body = Problem, content_type = "application/problem+json"), (status = 412, description = "The record is at another revision", body = Problem, content_type = "application/problem+json"), (status = 503, description = "The store is unavailable", body = Problem, content_type = "application/problem+json")))]
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

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Events with a greater seq.
    #[serde(default)]
    #[param(maximum = 9223372036854775807_u64)]
    after: u64,
    /// Long-poll: seconds to wait for a new event (at most 60).
    #[serde(default)]
    #[param(maximum = 60)]
    wait: u64,
    /// Events per page (at most 10,000; default 1000); pass `next` as `after` for the rest.
    #[serde(default = "default_event_limit")]
    #[param(minimum = 1, maximum = 10000)]
    limit: usize,
}

fn default_event_limit() -> usize {
    1000
}

#[utoipa::path(get, path = "/v1/jobs/{id}/events", operation_id = "jobEvents", summary = "A job's progress and log lines",
    params(("id" = String, Path, description = "A job id, or a job name (the job of that name that has not ended, else the newest)"), EventsQuery),
    responses((status = 200, description = "Events", body = EventPage), (status = 400, description = "A bad query", body = Problem, content_type = "application/problem+json"), (status = 401, description = "No or a wrong bearer token", body = Problem, content_type = "application/problem+json"), (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"), (status = 503, description = "The store is unavailable", body = Problem, content_type = "application/problem+json")))]
pub async fn job_events(
    state: web::Data<AppState>,
    id: web::Path<String>,
    q: web::Query<EventsQuery>,
) -> Result<HttpResponse> {
    if q.after > i64::MAX as u64 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "after must be at most 2^63-1",
        ));
    }
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

#[utoipa::path(get, path = "/v1/nodes", operation_id = "listNodes", summary = "Registered nodes",
    responses((status = 200, description = "Nodes", body = NodeList), (status = 401, description = "No or a wrong bearer token", body = Problem, content_type = "application/problem+json"), (status = 503, description = "The store is unavailable", body = Problem, content_type = "application/problem+json")))]
pub async fn list_nodes(state: web::Data<AppState>) -> Result<HttpResponse> {
    let nodes = state.jobs.nodes().await?;
    let coordinator = state.jobs.coordinator().await?;
    Ok(HttpResponse::Ok().json(NodeList { nodes, coordinator }))
}
