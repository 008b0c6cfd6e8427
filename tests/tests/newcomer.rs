//! The newcomer's path: `swarmtune demo` with a short budget, in this process (a coordinator
//! and three volunteers, each its own swarm on 127.0.0.1 sockets). The job runs to the end,
//! every published version is better on the held-out split than its parent, and the pulled
//! module is a PEFT adapter dir that beats the base there.

use std::time::Duration;

use swarmtune_node::demo::{DemoConfig, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_demo_ends_with_a_module_better_than_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let config = DemoConfig {
        dir: dir.path().to_owned(),
        volunteers: 3,
        rounds: Some(2),
        inner_steps: Some(10),
        threads_per_volunteer: 1,
        show: false,
        timeout: Duration::from_secs(900),
    };
    let report = run(&config).await.unwrap();

    let summary = report.status.summary.clone().unwrap();
    assert_eq!(summary.rounds_merged, 2, "{summary:?}");
    // Version 1 is the fresh adapter (B = 0: the base itself); then one version a round, each
    // published only if its held-out loss is lower.
    let losses: Vec<f64> = report
        .status
        .versions
        .iter()
        .map(|v| v.metrics.as_ref().unwrap().eval_loss)
        .collect();
    assert!(losses.len() >= 2, "{losses:?}");
    for pair in losses.windows(2) {
        assert!(
            pair[1] < pair[0],
            "a version is not better than its parent: {losses:?}"
        );
    }
    // Every merged round took a delta from each volunteer (quorum 3).
    for v in report.status.versions.iter().skip(1) {
        assert_eq!(v.contributors, 3, "{v:?}");
    }
    for file in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "manifest.json",
    ] {
        assert!(report.module_dir.join(file).is_file(), "{file} missing");
    }
    // The loss plot the demo leaves with --keep.
    let svg = std::fs::read_to_string(dir.path().join("loss.svg")).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("eval loss"),
        "{svg:.200}"
    );
    // The side-by-side ran on held-out prompts, and the module answers no worse than the base.
    assert!(!report.answers.is_empty());
    assert!(report.module_exact_match >= report.base_exact_match);
}
