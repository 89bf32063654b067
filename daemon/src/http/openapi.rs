//! The OpenAPI 3.1 document served at `/openapi.json`, generated from the handlers'
//! annotations and the API's own types (utoipa): schemas, enums and bounds come from the
//! types the handlers parse and answer with, so the document cannot drift from them. A test
//! checks that the document and the routes list the same operations; another runs
//! schemathesis against a live daemon.

use serde_json::{json, Value};
use utoipa::OpenApi;

use super::handlers;

#[derive(OpenApi)]
#[openapi(
    info(title = "ferry", description = "Distributed fine-tuning daemon: submit transfer-learning jobs, follow them, cancel them."),
    paths(
        handlers::healthz,
        handlers::readyz,
        handlers::metrics,
        handlers::openapi,
        handlers::submit,
        handlers::list_jobs,
        handlers::get_job,
        handlers::delete_job,
        handlers::cancel_job,
        handlers::job_events,
        handlers::list_nodes,
    ),
    components(schemas(
        ferry_cluster::api::JobSummaryList,
        ferry_cluster::api::DryRun,
        ferry_cluster::api::FieldError,
    )),
    modifiers(&Bearer),
    security(("bearer" = [])),
)]
struct Doc;

/// The bearer-token scheme every route but the probes needs.
struct Bearer;

impl utoipa::Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
    }
}

/// The document, with `version` as the API's version and response links from a created
/// job to what can be done with it (a stateful fuzzer walks them).
pub fn document(version: &str) -> Value {
    let mut doc = Doc::openapi();
    doc.info.version = version.to_string();
    let mut v = serde_json::to_value(&doc).expect("the document serialises");
    // An absent parameter is absent, not null: a header or query value is never `null`
    // (utoipa types an optional one as [T, "null"]).
    if let Some(paths) = v.get_mut("paths").and_then(Value::as_object_mut) {
        for op in paths
            .values_mut()
            .filter_map(Value::as_object_mut)
            .flat_map(|m| m.values_mut())
        {
            for p in op
                .get_mut("parameters")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if let Some(t) = p.pointer_mut("/schema/type") {
                    if let Some(types) = t.as_array() {
                        let kept: Vec<Value> =
                            types.iter().filter(|x| *x != "null").cloned().collect();
                        if kept.len() == 1 {
                            *t = kept[0].clone();
                        }
                    }
                }
            }
        }
    }
    let id = json!({"id": "$response.body#/id"});
    let links = json!({
        "GetJob": {"operationId": "getJob", "parameters": id},
        "JobEvents": {"operationId": "jobEvents", "parameters": id},
        "CancelJob": {"operationId": "cancelJob", "parameters": id},
        "DeleteJob": {"operationId": "deleteJob", "parameters": id},
    });
    for (path, method, code) in [
        ("/v1/jobs", "post", "201"),
        ("/v1/jobs/{id}", "get", "200"),
        ("/v1/jobs/{id}/cancel", "post", "202"),
    ] {
        if let Some(r) = v
            .pointer_mut(&format!(
                "/paths/{}/{method}/responses/{code}",
                path.replace('/', "~1")
            ))
            .and_then(Value::as_object_mut)
        {
            r.insert("links".into(), links.clone());
        }
    }
    // A 200 to a submit is a replay (the job) or a dry run that passed.
    if let Some(schema) =
        v.pointer_mut("/paths/~1v1~1jobs/post/responses/200/content/application~1json/schema")
    {
        *schema = json!({"oneOf": [
            {"$ref": "#/components/schemas/Job"},
            {"$ref": "#/components/schemas/DryRun"},
        ]});
    }
    // A spec that runs as it is on the demo's roots (and the tests'): the examples a
    // reader (or a fuzzer) starts from.
    let example = json!({
        "name": "example",
        "model": {"arch": "mlp", "num_classes": 4},
        "data": {"train": {"path": "train.safetensors"}},
        "train": {"epochs": 1, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05}},
        "output": {"dir": "example"}
    });
    if let Some(content) = v
        .pointer_mut("/paths/~1v1~1jobs/post/requestBody/content")
        .and_then(Value::as_object_mut)
    {
        for media in content.values_mut().filter_map(Value::as_object_mut) {
            media.insert("example".into(), example.clone());
        }
    }
    v
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
        for schema in ["Job", "DryRun", "JobSummaryList"] {
            assert!(
                doc.pointer(&format!("/components/schemas/{schema}"))
                    .is_some(),
                "{schema} is not in the document"
            );
        }
        assert!(doc
            .pointer("/paths/~1v1~1jobs/post/responses/200/content/application~1json/schema/oneOf")
            .is_some());
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
        // routes() registers 11 (method, path) pairs (and HEAD wherever GET).
        assert_eq!(
            documented, 11,
            "a route is missing from the OpenAPI document"
        );
    }
}
