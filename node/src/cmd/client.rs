//! `swarmtune submit`, `status` and `pull`: a job owner's and a module user's commands.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use libp2p_identity::PeerId;
use swarmtune_coordinator::engine::hex;
use swarmtune_protocol::BlobStore;
use swarmtune_protocol::net::transfer;
use swarmtune_protocol::v1;

use super::network::{MAX_BLOB_BYTES, runtime};
use crate::cli::{CoordinatorAddr, DataArgs, PullArgs, StatusArgs, SubmitArgs};
use crate::client;
use crate::config;
use crate::net;

/// The data dir and the coordinator a client command talks to.
fn target(
    data: &DataArgs,
    to: &CoordinatorAddr,
) -> anyhow::Result<(std::path::PathBuf, (PeerId, libp2p::Multiaddr))> {
    let data_dir = config::data_dir(data.data_dir.as_deref())?;
    let file = config::load(data.config.as_deref(), &data_dir)?;
    let coordinator = config::coordinator(to.coordinator.as_deref(), &file)?;
    Ok((data_dir, coordinator))
}

fn spinner(message: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(message);
    bar
}

/// `swarmtune submit`.
pub fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    // Checked before anything touches the network.
    let file = client::read_job_file(&args.job)?;
    let job_dir = args
        .job
        .parent()
        .map_or_else(|| std::path::PathBuf::from("."), |p| p.to_owned());
    let (data_dir, coordinator) = target(&args.data, &args.to)?;
    let addr = coordinator.1.clone();
    runtime()?.block_on(async move {
        // The owner signs with the data dir's key: the module belongs to it.
        let key = net::key(&data_dir)?;
        let store = BlobStore::open(data_dir.join("blobs"), MAX_BLOB_BYTES)?;
        let swarm = net::connect(
            Some(key.clone()),
            coordinator.clone(),
            Duration::from_secs(args.to.timeout),
        )
        .await?;
        transfer::spawn_server(&swarm.client, store.clone(), 4).await?;
        let submitted =
            client::submit(&swarm.client, &store, &key, coordinator.0, &file, &job_dir).await?;
        let job = hex(&submitted.job_id);
        println!("submitted job {job} (module {})", submitted.module);
        let bar = spinner("the coordinator is fetching the dataset from here".into());
        let summary = client::wait_prepared(
            &swarm.client,
            coordinator.0,
            &submitted.job_id,
            Duration::from_secs(args.upload_timeout),
        )
        .await;
        bar.finish_and_clear();
        let summary = summary?;
        println!("job {job} is {}", state_name(summary.state()));
        println!("follow it with: swarmtune status {job} --coordinator {addr}");
        println!(
            "pull the module with: swarmtune pull {} --out {} --coordinator {addr}",
            submitted.module, submitted.module
        );
        let _ = swarm.client.shutdown().await;
        Ok(())
    })
}

/// `swarmtune status`.
pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let (_, coordinator) = target(&args.data, &args.to)?;
    runtime()?.block_on(async move {
        let timeout = Duration::from_secs(args.to.timeout);
        let swarm = net::connect(None, coordinator.clone(), timeout).await?;
        let c = &swarm.client;
        let result = async {
            match &args.job {
                None => {
                    let jobs = client::jobs(c, coordinator.0).await?;
                    if args.json {
                        let jobs: Vec<_> = jobs.iter().map(summary_json).collect();
                        println!("{}", serde_json::json!({ "jobs": jobs }));
                    } else {
                        print_jobs(&jobs);
                    }
                    anyhow::ensure!(
                        args.plot.is_none(),
                        crate::InputError::new(
                            "--plot needs a job: swarmtune status JOB --plot FILE.svg"
                        )
                    );
                }
                Some(prefix) => {
                    let job = client::resolve_job(c, coordinator.0, prefix).await?;
                    let status = client::job_status(c, coordinator.0, &job).await?;
                    if args.json {
                        println!("{}", job_json(&status));
                    } else {
                        print_job(&status);
                    }
                    if let Some(path) = &args.plot {
                        let points: Vec<(u64, f64)> = status
                            .versions
                            .iter()
                            .filter_map(|v| v.metrics.as_ref().map(|m| (v.version, m.eval_loss)))
                            .collect();
                        let module = status.summary.as_ref().map_or("", |s| s.module.as_str());
                        crate::plot::eval_loss_svg(path, &format!("{module}: eval loss"), &points)?;
                        if !args.json {
                            println!("wrote {}", path.display());
                        }
                    }
                }
            }
            Ok(())
        }
        .await;
        let _ = swarm.client.shutdown().await;
        result
    })
}

/// `swarmtune pull`.
pub fn pull(args: PullArgs) -> anyhow::Result<()> {
    let (data_dir, coordinator) = target(&args.data, &args.to)?;
    let (module, version) = client::parse_module_ref(&args.module)?;
    runtime()?.block_on(async move {
        let timeout = Duration::from_secs(args.to.timeout);
        let swarm = net::connect(None, coordinator.clone(), timeout).await?;
        let store = BlobStore::open(data_dir.join("blobs"), MAX_BLOB_BYTES)?;
        let bar = spinner(format!("fetching {}", args.module));
        let pulled = client::pull(
            &swarm.client,
            &store,
            &data_dir,
            coordinator.0,
            &module,
            version,
            &args.out,
            args.merged,
        )
        .await;
        bar.finish_and_clear();
        let _ = swarm.client.shutdown().await;
        let pulled = pulled?;
        let m = &pulled.manifest;
        let loss = m
            .metrics
            .as_ref()
            .map(|x| format!(", eval loss {:.4}", x.eval_loss))
            .unwrap_or_default();
        println!(
            "{}@{} (round {}{loss}) -> {}",
            m.module,
            m.version,
            m.round,
            pulled.dir.display()
        );
        if let Some(merged) = &pulled.merged {
            println!("merged checkpoint -> {}", merged.display());
        }
        Ok(())
    })
}

fn state_name(state: v1::JobState) -> &'static str {
    match state {
        v1::JobState::Preparing => "preparing",
        v1::JobState::Running => "running",
        v1::JobState::Completed => "completed",
        v1::JobState::Failed => "failed",
        v1::JobState::Cancelled => "cancelled",
        _ => "unknown",
    }
}

fn print_jobs(jobs: &[v1::JobSummary]) {
    if jobs.is_empty() {
        println!("no jobs");
        return;
    }
    println!(
        "{:<16} {:<16} {:<10} {:>6} {:>8} {:>10} {:>12}",
        "job", "module", "state", "round", "version", "eval loss", "tokens"
    );
    for j in jobs {
        println!(
            "{:<16} {:<16} {:<10} {:>6} {:>8} {:>10} {:>12}",
            &hex(&j.job_id)[..16.min(j.job_id.len() * 2)],
            j.module,
            state_name(j.state()),
            j.round,
            j.latest_version,
            j.latest_metrics
                .as_ref()
                .map_or("-".into(), |m| format!("{:.4}", m.eval_loss)),
            j.tokens_trained
        );
    }
}

fn print_job(status: &v1::JobStatus) {
    let Some(s) = &status.summary else {
        println!("no summary");
        return;
    };
    println!("job      {}", hex(&s.job_id));
    println!("module   {}", s.module);
    let message = if s.message.is_empty() {
        String::new()
    } else {
        format!(" ({})", s.message)
    };
    println!("state    {}{message}", state_name(s.state()));
    let budget = if s.rounds_budget > 0 {
        format!("{} of {} rounds merged", s.rounds_merged, s.rounds_budget)
    } else {
        format!("{} of {} tokens", s.tokens_trained, s.token_budget)
    };
    println!(
        "progress {budget}; round {} open, {} of {} deltas accepted, {} leases out",
        s.round, s.round_accepted_deltas, s.quorum, s.active_leases
    );
    println!();
    println!(
        "{:>7} {:>6} {:>10} {:>10} {:>8} {:>12} {:>6}",
        "version", "round", "eval loss", "perplexity", "exact", "tokens", "peers"
    );
    for v in &status.versions {
        let m = v.metrics.unwrap_or_default();
        let exact = if m.exact_match_examples > 0 {
            format!("{:.0}%", 100.0 * m.exact_match)
        } else {
            "-".into()
        };
        println!(
            "{:>7} {:>6} {:>10.4} {:>10.2} {:>8} {:>12} {:>6}",
            v.version, v.round, m.eval_loss, m.perplexity, exact, v.tokens, v.contributors
        );
    }
    if !status.active_peers.is_empty() {
        println!();
        println!(
            "{:<54} {:>6} {:>9} {:>8} {:>10}",
            "active peer", "lease", "steps", "loss", "reputation"
        );
        for p in &status.active_peers {
            println!(
                "{:<54} {:>6} {:>9} {:>8.3} {:>10.2}",
                peer_name(&p.peer_id),
                p.lease_id,
                format!("{}/{}", p.steps_done, p.inner_steps),
                p.last_loss,
                p.reputation
            );
        }
    }
    if !status.recent_verdicts.is_empty() {
        println!();
        println!("recent verdicts");
        for v in &status.recent_verdicts {
            let what = if v.outcome() == v1::VerdictOutcome::Accepted {
                "accepted".to_owned()
            } else {
                format!("rejected ({:?}) {}", v.reason(), v.message)
            };
            let banned = if v.banned { ", banned" } else { "" };
            println!(
                "  round {:>3} lease {:>5} {}: {what}{banned}",
                v.round,
                v.lease_id,
                peer_name(&v.peer_id)
            );
        }
    }
}

fn peer_name(bytes: &[u8]) -> String {
    PeerId::from_bytes(bytes).map_or_else(|_| hex(bytes), |p| p.to_string())
}

fn summary_json(s: &v1::JobSummary) -> serde_json::Value {
    serde_json::json!({
        "job": hex(&s.job_id),
        "module": s.module,
        "owner": peer_name(&s.owner_peer_id),
        "state": state_name(s.state()),
        "message": s.message,
        "created_at_unix_ms": s.created_at_unix_ms,
        "round": s.round,
        "rounds_merged": s.rounds_merged,
        "rounds_budget": s.rounds_budget,
        "token_budget": s.token_budget,
        "tokens_trained": s.tokens_trained,
        "latest_version": s.latest_version,
        "latest_metrics": s.latest_metrics.as_ref().map(client::metrics_json),
        "round_deadline_unix_ms": s.round_deadline_unix_ms,
        "round_accepted_deltas": s.round_accepted_deltas,
        "quorum": s.quorum,
        "active_leases": s.active_leases,
    })
}

fn job_json(status: &v1::JobStatus) -> serde_json::Value {
    serde_json::json!({
        "summary": status.summary.as_ref().map(summary_json),
        "versions": status.versions.iter().map(|v| serde_json::json!({
            "version": v.version,
            "parent_version": v.parent_version,
            "round": v.round,
            "created_at_unix_ms": v.created_at_unix_ms,
            "metrics": v.metrics.as_ref().map(client::metrics_json),
            "adapter": v.adapter.as_ref().and_then(|c| swarmtune_protocol::ContentId::try_from(c).ok()).map(|c| c.to_string()),
            "tokens": v.tokens,
            "contributors": v.contributors,
        })).collect::<Vec<_>>(),
        "active_peers": status.active_peers.iter().map(|p| serde_json::json!({
            "peer": peer_name(&p.peer_id),
            "lease_id": p.lease_id,
            "round": p.round,
            "steps_done": p.steps_done,
            "inner_steps": p.inner_steps,
            "last_loss": p.last_loss,
            "expires_at_unix_ms": p.expires_at_unix_ms,
            "reputation": p.reputation,
        })).collect::<Vec<_>>(),
        "recent_verdicts": status.recent_verdicts.iter().map(|v| serde_json::json!({
            "round": v.round,
            "lease_id": v.lease_id,
            "peer": peer_name(&v.peer_id),
            "accepted": v.outcome() == v1::VerdictOutcome::Accepted,
            "reason": format!("{:?}", v.reason()),
            "message": v.message,
            "segments_checked": v.segments_checked,
            "reputation_after": v.reputation_after,
            "banned": v.banned,
        })).collect::<Vec<_>>(),
    })
}
