//! A blocking HTTP client for ferryd's REST API that turns every failure into a message
//! a person can act on.

use std::time::Duration;

use anyhow::Result;
use ferry_cluster::api::Problem;
use serde::de::DeserializeOwned;

/// What kind of failure a request met: it decides ferryctl's exit status, and whether
/// following a job waits and tries again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No answer: ferryd is down, restarting, unreachable, or too slow (also a 502-504
    /// from a proxy in front of it). Worth trying again.
    Unreachable,
    /// ferryd answered and refused the request (a bad spec, an unknown job, no token).
    Rejected,
}

/// A failed request, with the message to show.
#[derive(Debug)]
pub struct RequestError {
    pub failure: Failure,
    pub message: String,
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RequestError {}

fn failed(failure: Failure, message: String) -> anyhow::Error {
    RequestError { failure, message }.into()
}

/// The kind of failure behind `e`, if a request failed.
pub fn failure(e: &anyhow::Error) -> Option<Failure> {
    e.downcast_ref::<RequestError>().map(|r| r.failure)
}

/// ferryd's address and credentials.
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// A client for `server` (`http://host:port`; a bare `host:port` gets `http://`).
    pub fn new(server: &str, token: Option<String>) -> Client {
        let base = if server.contains("://") {
            server.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", server.trim_end_matches('/'))
        };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout_read(Duration::from_secs(90))
            .build();
        Client { base, token, agent }
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let r = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }

    fn explain(&self, e: ureq::Error) -> anyhow::Error {
        match e {
            ureq::Error::Status(code @ 502..=504, resp) => failed(
                Failure::Unreachable,
                format!(
                    "ferryd at {} is unavailable ({code}: {})",
                    self.base,
                    resp.into_string().unwrap_or_default().trim()
                ),
            ),
            ureq::Error::Status(code, resp) => {
                let body = resp.into_string().unwrap_or_default();
                let message = match serde_json::from_str::<Problem>(&body) {
                    Ok(p) if code == 401 => format!("{}: {} (ferryd at {} needs a token: pass --token or set FERRY_TOKEN)", p.title, p.detail, self.base),
                    Ok(p) if !p.errors.is_empty() => {
                        let lines: Vec<String> = p.errors.iter().map(|e| format!("  {}: {}", e.field, e.message)).collect();
                        format!("{} ({}):\n{}", p.title, code, lines.join("\n"))
                    }
                    Ok(p) => format!("{} ({}): {}", p.title, code, p.detail),
                    Err(_) => format!("ferryd at {} answered {code}: {}", self.base, body.trim()),
                };
                failed(Failure::Rejected, message)
            }
            ureq::Error::Transport(t) => failed(
                Failure::Unreachable,
                format!(
                    "cannot reach ferryd at {}: {}. Is it running? Start one with `ferryd --standalone`, or point --server / FERRY_SERVER at it.",
                    self.base,
                    t.to_string().rsplit(": ").next().unwrap_or("connection failed")
                ),
            ),
        }
    }

    /// The server's address, for messages.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The JSON answer to `method path`, or what went wrong.
    fn json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        answer: std::result::Result<ureq::Response, ureq::Error>,
    ) -> Result<T> {
        let resp = answer.map_err(|e| self.explain(e))?;
        resp.into_json().map_err(|e| {
            failed(
                Failure::Unreachable,
                format!("ferryd sent an unreadable answer to {method} {path}: {e}"),
            )
        })
    }

    /// GET a JSON document.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json("GET", path, self.request("GET", path).call())
    }

    /// DELETE and read JSON back.
    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json("DELETE", path, self.request("DELETE", path).call())
    }

    /// POST a body (or none) and read JSON back.
    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        content_type: &str,
        body: &str,
    ) -> Result<T> {
        self.post_with(path, content_type, body, &[])
    }

    /// POST with extra headers (`Idempotency-Key`).
    pub fn post_with<T: DeserializeOwned>(
        &self,
        path: &str,
        content_type: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> Result<T> {
        let mut req = self.request("POST", path).set("Content-Type", content_type);
        for (k, v) in headers {
            req = req.set(k, v);
        }
        self.json("POST", path, req.send_string(body))
    }
}

/// Percent-encodes a path segment (job names and ids are plain, but be safe).
pub fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
