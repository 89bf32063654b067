//! RFC 9457 problem responses for every error the API returns.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use ferry_cluster::api::{FieldError, Problem, PROBLEM_JSON};

use crate::jobs::JobError;
use ferry_cluster::store::StoreError;

/// An error on its way to the client as `application/problem+json`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub title: &'static str,
    pub detail: String,
    pub errors: Vec<FieldError>,
}

impl ApiError {
    pub fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            title,
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    /// The problem type URI: a stable, documented identifier per kind of error.
    fn type_uri(&self) -> String {
        format!(
            "https://ferry.dev/problems/{}",
            self.title.to_ascii_lowercase().replace(' ', "-")
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.title, self.detail)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let p = Problem {
            type_: self.type_uri(),
            title: self.title.to_string(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            instance: None,
            errors: self.errors.clone(),
        };
        let mut r = HttpResponse::build(self.status);
        r.content_type(PROBLEM_JSON);
        if self.status == StatusCode::UNAUTHORIZED {
            r.insert_header(("WWW-Authenticate", "Bearer realm=\"ferry\""));
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.insert_header(("Retry-After", "30"));
        }
        r.json(p)
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Invalid(errors) => {
                let detail = errors
                    .iter()
                    .map(|e| format!("{}: {}", e.field, e.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                ApiError {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    title: "Invalid job spec",
                    detail,
                    errors,
                }
            }
            JobError::NotFound(what) => ApiError::new(
                StatusCode::NOT_FOUND,
                "Job not found",
                format!("no job has the id or name `{what}`"),
            ),
            JobError::Conflict(msg) => ApiError::new(StatusCode::CONFLICT, "Conflict", msg),
            JobError::KeyReused(msg) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Idempotency-Key reused",
                msg,
            ),
            JobError::PreconditionFailed(msg) => {
                ApiError::new(StatusCode::PRECONDITION_FAILED, "Precondition failed", msg)
            }
            JobError::Busy(msg) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "Too many requests", msg)
            }
            JobError::Stale => ApiError::new(
                StatusCode::CONFLICT,
                "Conflict",
                "the job changed while the request ran; try again",
            ),
            JobError::Store(e @ StoreError::Refused(_)) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "Store refused the request",
                e.to_string(),
            ),
            JobError::Store(e) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Store unavailable",
                e.to_string(),
            ),
        }
    }
}
