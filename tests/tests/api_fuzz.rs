//! schemathesis (PyPI, in `.venv-api`, set up by `scripts/setup.sh`) against a live daemon,
//! driven by the OpenAPI document the daemon serves: every operation with generated valid
//! and invalid inputs, then the stateful phase that follows the document's links from a
//! created job to its reads, events, cancel and delete. Any check that fails (a 5xx, a
//! status or a body the document does not announce, an invalid input accepted, a token
//! not enforced, ...) fails the test. Bounded: a fixed seed, few examples per operation,
//! and a time budget.

use std::process::Command;

use ferry_tests::{workspace, Daemon};

#[test]
fn schemathesis_finds_nothing_wrong_with_the_live_api() {
    let st = workspace().join(".venv-api/bin/schemathesis");
    assert!(
        st.is_file(),
        "{} is missing: run scripts/setup.sh",
        st.display()
    );
    let token = "fuzz-token-0123456789abcdef";
    let d = Daemon::start_with(Some(token));
    let report = tempfile::tempdir().unwrap();
    let out = Command::new(&st)
        .arg("--config-file")
        .arg(workspace().join("tests/schemathesis.toml"))
        .args(["run", &d.url("/openapi.json")])
        .args(["--checks", "all", "--mode", "all"])
        .args(["--max-examples", "30", "--seed", "7", "--workers", "1"])
        .args(["--max-time", "240", "--request-timeout", "70"])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--no-color", "--warnings", "off"])
        .arg("--report-dir")
        .arg(report.path())
        .env("SCHEMATHESIS_HOOKS", "")
        // Its caches land in its working directory: the temporary one, not the tree.
        .current_dir(report.path())
        .output()
        .expect("schemathesis runs");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    // It did test: every operation it selected, and it says so.
    assert!(text.contains("No issues found"), "{text}");
    let count = |label: &str| -> Option<String> {
        let line = text.lines().find(|l| l.trim_start().starts_with(label))?;
        Some(line.trim_start()[label.len()..].trim().to_string())
    };
    let selected = count("Selected:").expect("a summary");
    let tested = count("Tested:").expect("a summary");
    assert_eq!(selected, format!("{tested}/{tested}"), "{text}");
    assert!(tested.parse::<u32>().unwrap() >= 10, "{text}");
    assert!(d.get("/healthz").0 == 200, "the daemon is still up");
}
