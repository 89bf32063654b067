//! The OpenAPI 3.0 document served at `/openapi.json`. Written by hand next to the routes;
//! a test checks that the two list the same operations.

use serde_json::{json, Value};

fn problem_responses(codes: &[&str]) -> Value {
    let mut m = serde_json::Map::new();
    for c in codes {
        m.insert(
            (*c).to_string(),
            json!({"description": "An RFC 9457 problem", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}),
        );
    }
    Value::Object(m)
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

fn ok_json(code: &str, description: &str, schema: &str) -> Value {
    json!({code: {"description": description, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}}})
}

fn id_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "description": "A job id, or a job name (the newest job with that name)", "schema": {"type": "string"}})
}

/// The document.
pub fn document(version: &str) -> Value {
    let opt_num = json!({"type": "number", "nullable": true});
    json!({
        "openapi": "3.0.3",
        "info": {"title": "ferry", "version": version, "description": "Distributed fine-tuning daemon: submit transfer-learning jobs, follow them, cancel them."},
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {"operationId": "healthz", "summary": "Liveness", "security": [], "responses": {"200": {"description": "The process is up", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/readyz": {"get": {"operationId": "readyz", "summary": "Readiness: the node is registered in the store", "security": [],
                "responses": merge(json!({"200": {"description": "Ready", "content": {"text/plain": {"schema": {"type": "string"}}}}}), problem_responses(&["503"]))}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics", "responses": merge(json!({"200": {"description": "Text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}}), problem_responses(&["401"]))}},
            "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document", "responses": merge(json!({"200": {"description": "OpenAPI 3 document", "content": {"application/json": {"schema": {"type": "object"}}}}}), problem_responses(&["401"]))}},
            "/v1/jobs": {
                "post": {"operationId": "submitJob", "summary": "Submit a job",
                    "description": "A job's model is code: submitting a TorchScript model runs it as ferryd's user on the nodes the job is placed on (confined by rank_sandbox where it applies; see docs/security.md). Beyond max_queued_jobs Pending jobs, or max_requests_per_client requests in flight, the answer is 429 with Retry-After; a body slower than body_timeout_ms gets 408.",
                    "requestBody": {"required": true, "description": "The job spec (v1), as YAML or JSON",
                        "content": {"application/yaml": {"schema": {"$ref": "#/components/schemas/JobSpec"}}, "application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}}},
                    "responses": merge(ok_json("201", "The job, Pending", "Job"), problem_responses(&["400", "401", "408", "409", "413", "415", "422", "429", "503"]))},
                "get": {"operationId": "listJobs", "summary": "List jobs, oldest first (by id, which grows with submission time)",
                    "parameters": [
                        {"name": "phase", "in": "query", "schema": {"$ref": "#/components/schemas/JobPhase"}},
                        {"name": "name", "in": "query", "schema": {"type": "string"}},
                        {"name": "limit", "in": "query", "description": "Jobs per page; without it, every job", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                        {"name": "continue", "in": "query", "description": "The previous page's `continue` token (opaque)", "schema": {"type": "string"}}],
                    "responses": merge(ok_json("200", "Jobs", "JobList"), problem_responses(&["400", "401", "503"]))}
            },
            "/v1/jobs/{id}": {"get": {"operationId": "getJob", "summary": "One job", "parameters": [id_param()],
                "responses": merge(ok_json("200", "The job", "Job"), problem_responses(&["401", "404", "503"]))},
                "delete": {"operationId": "deleteJob", "summary": "Delete a job that has ended, with its events (its outputs stay)", "parameters": [id_param()],
                "responses": merge(ok_json("200", "The deleted job", "Job"), problem_responses(&["401", "404", "409", "503"]))}},
            "/v1/jobs/{id}/cancel": {"post": {"operationId": "cancelJob", "summary": "Cancel a job", "parameters": [id_param()],
                "responses": merge(ok_json("202", "Cancellation requested (or done, for a Pending job)", "Job"), problem_responses(&["401", "404", "409", "503"]))}},
            "/v1/jobs/{id}/events": {"get": {"operationId": "jobEvents", "summary": "A job's progress and log lines",
                "parameters": [id_param(),
                    {"name": "after", "in": "query", "description": "Return events with seq greater than this", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "wait", "in": "query", "description": "Long-poll: seconds (<= 60) to wait for a new event", "schema": {"type": "integer", "minimum": 0, "maximum": 60}},
                    {"name": "limit", "in": "query", "description": "Events per page (default 1000, at most 10000); pass `next` as `after` for the rest", "schema": {"type": "integer", "minimum": 1, "maximum": 10000}}],
                "responses": merge(ok_json("200", "Events", "EventPage"), problem_responses(&["400", "401", "404", "503"]))}},
            "/v1/nodes": {"get": {"operationId": "listNodes", "summary": "Registered nodes", "responses": merge(ok_json("200", "Nodes", "NodeList"), problem_responses(&["401", "503"]))}}
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Problem": {"type": "object", "required": ["type", "title", "status", "detail"], "properties": {
                    "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"}, "detail": {"type": "string"},
                    "instance": {"type": "string"},
                    "errors": {"type": "array", "items": {"type": "object", "required": ["field", "message"], "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}}}},
                "JobPhase": {"type": "string", "enum": ["Pending", "Running", "Succeeded", "Failed", "Cancelled"]},
                "JobStatus": {"type": "object", "properties": {
                    "epoch": {"type": "integer"}, "total_epochs": {"type": "integer"}, "step": {"type": "integer"}, "total_steps": {"type": "integer"},
                    "train_loss": opt_num, "val_accuracy": opt_num, "samples_per_sec": opt_num,
                    "checkpoint": {"type": "string"}, "output_dir": {"type": "string"}, "failure": {"type": "string"},
                    "started_at": {"type": "string", "format": "date-time"}, "finished_at": {"type": "string", "format": "date-time"},
                    "attempts": {"type": "integer"}}},
                "Job": {"type": "object", "required": ["id", "name", "phase", "spec", "status", "created_at"], "properties": {
                    "id": {"type": "string"}, "name": {"type": "string"}, "phase": {"$ref": "#/components/schemas/JobPhase"},
                    "spec": {"$ref": "#/components/schemas/JobSpec"}, "status": {"$ref": "#/components/schemas/JobStatus"},
                    "created_at": {"type": "string", "format": "date-time"}, "node": {"type": "string"},
                    "cancel_requested": {"type": "boolean"}, "revision": {"type": "integer"}}},
                "JobList": {"type": "object", "required": ["jobs"], "properties": {"jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
                    "continue": {"type": "string", "description": "With limit: pass as `continue` for the next page; absent on the last"}}},
                "JobEvent": {"type": "object", "required": ["seq", "time", "kind", "message"], "properties": {
                    "seq": {"type": "integer"}, "time": {"type": "string", "format": "date-time"},
                    "kind": {"type": "string", "enum": ["phase", "progress", "eval", "checkpoint", "log", "init"]},
                    "message": {"type": "string"}, "data": {"type": "object"}}},
                "EventPage": {"type": "object", "required": ["events", "next", "phase"], "properties": {
                    "events": {"type": "array", "items": {"$ref": "#/components/schemas/JobEvent"}}, "next": {"type": "integer"},
                    "phase": {"$ref": "#/components/schemas/JobPhase"}}},
                "Node": {"type": "object", "required": ["name", "role", "address", "version", "cpus", "cuda_devices", "started_at", "mode"], "properties": {
                    "name": {"type": "string"}, "role": {"type": "string", "enum": ["worker", "teacher"]}, "address": {"type": "string"},
                    "version": {"type": "string"}, "cpus": {"type": "integer"}, "cuda_devices": {"type": "integer"},
                    "started_at": {"type": "string", "format": "date-time"}, "mode": {"type": "string", "enum": ["standalone", "cluster"]},
                    "running_jobs": {"type": "array", "items": {"type": "string"}}}},
                "NodeList": {"type": "object", "required": ["nodes"], "properties": {"nodes": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}}, "coordinator": {"type": "string", "description": "The node that coordinates the cluster now; absent while an election is open"}}},
                "JobSpec": {"type": "object", "additionalProperties": false, "required": ["name", "model", "data", "output"],
                    "description": "See docs/job-spec.md",
                    "properties": {
                        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"},
                        "model": {"type": "object", "additionalProperties": false, "required": ["arch"], "properties": {
                            "arch": {"type": "string", "enum": ["torchscript", "resnet18", "resnet50", "cnn", "mlp"]},
                            "path": {"type": "string"}, "num_classes": {"type": "integer", "minimum": 1}, "init": {"type": "string"},
                            "freeze": {"type": "array", "items": {"type": "string"}}, "freeze_bn": {"type": "string", "enum": ["eval", "train"]},
                            "jit_optimize": {"type": "boolean"}}},
                        "data": {"type": "object", "additionalProperties": false, "required": ["train"], "properties": {
                            "train": {"$ref": "#/components/schemas/DataSource"}, "val": {"$ref": "#/components/schemas/DataSource"},
                            "unlabelled": {"$ref": "#/components/schemas/DataSource"},
                            "image_size": {"type": "integer", "minimum": 1, "maximum": 4096}, "channels": {"type": "integer", "enum": [1, 3]},
                            "shuffle": {"type": "boolean"},
                            "normalize": {"type": "object", "additionalProperties": false, "required": ["mean", "std"], "properties": {
                                "mean": {"type": "array", "items": {"type": "number"}}, "std": {"type": "array", "items": {"type": "number"}}}}}},
                        "train": {"type": "object", "additionalProperties": false, "properties": {
                            "epochs": {"type": "integer", "minimum": 1}, "batch_size": {"type": "integer", "minimum": 1},
                            "optimizer": {"type": "object", "additionalProperties": false, "required": ["name", "lr"], "properties": {
                                "name": {"type": "string", "enum": ["sgd", "adamw"]}, "lr": {"type": "number", "exclusiveMinimum": true, "minimum": 0},
                                "momentum": {"type": "number"}, "nesterov": {"type": "boolean"}, "weight_decay": {"type": "number"},
                                "betas": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}, "eps": {"type": "number"}}},
                            "lr_schedule": {"type": "object", "additionalProperties": false, "required": ["name"], "properties": {
                                "name": {"type": "string", "enum": ["constant", "cosine", "step"]}, "warmup_steps": {"type": "integer"},
                                "step_size": {"type": "integer"}, "gamma": {"type": "number"}, "min_lr": {"type": "number"}}},
                            "seed": {"type": "integer"}, "checkpoint_every_steps": {"type": "integer"}, "keep_checkpoints": {"type": "integer", "minimum": 1},
                            "max_steps": {"type": "integer", "minimum": 1}, "bucket_mb": {"type": "number"},
                            "overlap_grad_sync": {"type": "string", "enum": ["auto", "always", "never"]},
                            "precision": {"type": "string", "enum": ["fp32", "fp16", "bf16"]},
                            "grad_compression": {"type": "string", "enum": ["none", "bf16", "fp16"]}}},
                        "resources": {"type": "object", "additionalProperties": false, "properties": {
                            "ranks": {"type": "integer", "minimum": 1}, "device": {"type": "string", "enum": ["cpu", "cuda"]}, "threads": {"type": "integer", "minimum": 1}}},
                        "output": {"type": "object", "additionalProperties": false, "required": ["dir"], "properties": {"dir": {"type": "string"}}},
                        "restart": {"type": "object", "additionalProperties": false, "properties": {"max_restarts": {"type": "integer", "minimum": 0, "maximum": 100}}},
                        "distill": {"type": "object", "additionalProperties": false, "required": ["teacher"], "properties": {
                            "teacher": {"type": "object", "additionalProperties": false, "required": ["arch"], "properties": {
                                "arch": {"type": "string", "enum": ["torchscript", "resnet18", "resnet50", "cnn", "mlp"]},
                                "path": {"type": "string"}, "num_classes": {"type": "integer", "minimum": 1}, "init": {"type": "string"},
                                "replicas": {"type": "integer", "minimum": 1, "maximum": 16}, "max_batch": {"type": "integer", "minimum": 1},
                                "threads": {"type": "integer", "minimum": 1}, "max_restarts": {"type": "integer", "minimum": 0, "maximum": 100}}},
                            "temperature": {"type": "number"}, "alpha": {"type": "number", "minimum": 0, "maximum": 1},
                            "top_k": {"type": "integer", "minimum": 0, "maximum": 65535},
                            "on_teacher_failure": {"type": "string", "enum": ["wait", "hard-labels", "fail"]},
                            "mode": {"type": "string", "enum": ["index", "tensor"]},
                            "deadline_ms": {"type": "integer", "minimum": 1}, "wait_timeout_s": {"type": "integer", "minimum": 1},
                            "prefetch": {"type": "integer", "minimum": 0}, "cache": {"type": "boolean"}}}}},
                "DataSource": {"type": "object", "additionalProperties": false, "required": ["path"], "properties": {"path": {"type": "string"}}}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use actix_web::{test, web, App};

    /// Every operation in the document is routed, and every route is documented.
    #[actix_web::test]
    async fn document_and_routes_agree() {
        let doc = super::document("test");
        let app = test::init_service(App::new().configure(super::super::routes).default_service(
            web::to(|| async { actix_web::HttpResponse::ImATeapot().finish() }),
        ))
        .await;
        let mut documented = 0;
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                documented += 1;
                let uri = path.replace("{id}", "some-job");
                let req = match method.as_str() {
                    "get" => test::TestRequest::get(),
                    "post" => test::TestRequest::post(),
                    "delete" => test::TestRequest::delete(),
                    m => panic!("unexpected method {m}"),
                }
                .uri(&uri)
                .to_request();
                let res = test::call_service(&app, req).await;
                // Without state handlers fail with 500, but a route exists: not the teapot.
                assert_ne!(
                    res.status().as_u16(),
                    418,
                    "{method} {path} is documented but not routed"
                );
            }
        }
        // routes() registers 11 (method, path) pairs.
        assert_eq!(
            documented, 11,
            "a route is missing from the OpenAPI document"
        );
    }
}
