//! Checked-in generated files must match what the code generates.

use std::path::Path;

use celery_operator::crd::{all_crds, crd_file_name, crd_yaml};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root")
}

#[test]
fn crds_directory_is_fresh() {
    for crd in all_crds() {
        let path = repo().join("crds").join(crd_file_name(&crd));
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == crd_yaml(&crd),
            "{} is stale: run `cargo run -p celery-operator -- crd --out-dir crds`",
            path.display()
        );
    }
}

#[test]
fn render_of_examples_matches_the_checked_in_output() {
    let rendered = celery_operator::render::render_paths(&[repo().join("examples")]).expect("examples render");
    let rendered = rendered.replace(&format!("{}/", repo().display()), "");
    let expected_path = repo().join("operator/tests/fixtures/render-examples.yaml");
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&expected_path, &rendered).unwrap();
        return;
    }
    assert!(rendered == expected, "render output changed: rerun with UPDATE_GOLDEN=1 and review the diff");
    // The golden file itself pins the behaviour a reviewer cares about.
    assert_eq!(rendered.matches("kind: Deployment").count(), 3, "mail-worker, mail-beat, reports-worker");
    assert!(!rendered.contains("change-me"), "no secret value may leak into rendered output");
    assert!(!rendered.lines().any(|l| l.trim() == "- -B" || l.trim() == "- --beat"));
}

#[test]
fn render_reports_invalid_objects_by_file_object_and_field() {
    let docs = vec![(
        "bad.yaml".to_string(),
        "apiVersion: celery-operator.dev/v1alpha1\nkind: WorkerPool\nmetadata: {name: bad}\nspec:\n  app: a\n  image: i\n  queues: [q]\n  autoscaling: {minReplicas: 3, maxReplicas: 1}\n---\napiVersion: celery-operator.dev/v1alpha1\nkind: WorkerPool\nmetadata: {name: orphan}\nspec: {app: a, image: i, queues: [missing]}\n"
            .to_string(),
    )];
    let errors = celery_operator::render::render_documents(&docs).unwrap_err();
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(text.len(), 2, "{text:?}");
    assert!(text[0].starts_with("bad.yaml#0: WorkerPool bad: spec.autoscaling: minReplicas must be"), "{}", text[0]);
    assert!(text[1].contains("WorkerPool orphan: spec.queues[0]: TaskQueue \"missing\" not found"), "{}", text[1]);
}
