//! `swarmtune demo`: the whole network on this machine. A coordinator and volunteers, each a
//! swarm of its own on real 127.0.0.1 sockets in this process, train the built-in base's
//! "shout" skill from `examples/job.toml`; a job owner submits it, a module user pulls the
//! result, and the base's and the module's answers to held-out prompts are shown side by side.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::MultiProgress;
use libp2p::Multiaddr;
use libp2p_identity::PeerId;
use swarmtune_coordinator::engine::hex;
use swarmtune_coordinator::service::{self, ServiceConfig};
use swarmtune_protocol::BlobStore;
use swarmtune_protocol::net::transfer;
use swarmtune_protocol::v1;
use swarmtune_trainer::builtin::skill::Skill;
use swarmtune_trainer::data::Example;
use swarmtune_trainer::eval::{Answer, answers, exact_match};
use swarmtune_trainer::lora::{Adapter, DeviceLora};
use swarmtune_trainer::model::{CausalLm, ForwardOptions};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::client;
use crate::cmd::network::{MAX_BLOB_BYTES, open_engine, say, show_reports};
use crate::net;
use crate::volunteer::{self, VolunteerConfig};

/// The job the demo runs: the repository's example.
pub const JOB_TOML: &str = include_str!("../../examples/job.toml");

/// What the demo is asked to do.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Where the data dirs, the dataset, the plot and the module go.
    pub dir: PathBuf,
    /// Volunteers to start.
    pub volunteers: usize,
    /// Rounds (None: the job file's).
    pub rounds: Option<u64>,
    /// Steps per lease (None: the job file's).
    pub inner_steps: Option<u32>,
    /// Math threads per volunteer.
    pub threads_per_volunteer: usize,
    /// Draw progress bars and print the story (off in tests).
    pub show: bool,
    /// The longest the whole run may take.
    pub timeout: Duration,
}

/// What the demo produced.
#[derive(Debug)]
pub struct DemoReport {
    /// The job's id.
    pub job_id: [u8; 32],
    /// The job's final status, its versions oldest first.
    pub status: v1::JobStatus,
    /// The pulled module's directory (a PEFT adapter dir).
    pub module_dir: PathBuf,
    /// Base and module answers to the held-out prompts.
    pub answers: Vec<(Answer, Answer)>,
    /// Exact match of the base on the held-out prompts.
    pub base_exact_match: f64,
    /// Exact match of base + module.
    pub module_exact_match: f64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Examples written to the dataset, and prompts held out for the side-by-side.
const TRAIN_EXAMPLES: usize = 2000;
const HELD_OUT: usize = 24;
const SEED: u64 = 11;

/// Writes the job and its dataset into `dir/job`; returns the job file's path.
pub fn write_job(dir: &Path) -> anyhow::Result<(PathBuf, Vec<Example>)> {
    let job_dir = dir.join("job");
    std::fs::create_dir_all(&job_dir)?;
    let (train, held_out) = Skill::Shout.splits(SEED, TRAIN_EXAMPLES, HELD_OUT);
    let mut lines = String::new();
    for e in &train {
        if let Example::PromptCompletion { prompt, completion } = e {
            lines.push_str(
                &serde_json::json!({"prompt": prompt, "completion": completion}).to_string(),
            );
            lines.push('\n');
        }
    }
    std::fs::write(job_dir.join("shout.jsonl"), lines)?;
    let path = job_dir.join("job.toml");
    std::fs::write(&path, JOB_TOML)?;
    Ok((path, held_out))
}

struct Volunteer {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
    client: swarmtune_protocol::net::Client,
}

/// Runs the demo.
pub async fn run(config: &DemoConfig) -> anyhow::Result<DemoReport> {
    let started = Instant::now();
    let dir = &config.dir;
    std::fs::create_dir_all(dir)?;
    let say = |text: String| {
        if config.show {
            println!("{text}");
        }
    };
    let loopback: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse()?;

    // The coordinator.
    let coordinator_dir = dir.join("coordinator");
    std::fs::create_dir_all(&coordinator_dir)?;
    let key = net::key(&coordinator_dir)?;
    let engine = Arc::new(open_engine(&coordinator_dir, key.clone())?);
    let swarm = net::start(key, std::slice::from_ref(&loopback), Vec::new(), false).await?;
    let coordinator_id = swarm.client.local_peer_id();
    let coordinator_addr = swarm
        .addrs
        .first()
        .cloned()
        .context("the coordinator has no address")?;
    say(format!(
        "coordinator {coordinator_id} at {coordinator_addr}"
    ));
    let (stop_coordinator, stopped) = oneshot::channel::<()>();
    let coordinator_client = swarm.client.clone();
    let service_config = ServiceConfig {
        tick: Duration::from_millis(250),
        ..ServiceConfig::default()
    };
    let coordinator_task = tokio::spawn(service::run(
        engine,
        swarm.client,
        swarm.events,
        service_config,
        async move {
            let _ = stopped.await;
        },
    ));

    // The volunteers.
    let bars = if config.show {
        MultiProgress::new()
    } else {
        MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
    };
    let mut volunteers = Vec::new();
    for i in 1..=config.volunteers {
        let vdir = dir.join(format!("volunteer-{i}"));
        std::fs::create_dir_all(&vdir)?;
        let key = net::key(&vdir)?;
        let swarm = net::start(
            key,
            std::slice::from_ref(&loopback),
            vec![coordinator_addr.clone()],
            false,
        )
        .await?;
        let store = BlobStore::open(vdir.join("blobs"), MAX_BLOB_BYTES)?;
        let mut settings = VolunteerConfig::new(&vdir);
        settings.threads = config.threads_per_volunteer;
        settings.coordinators = vec![coordinator_id];
        settings.min_backoff = Duration::from_millis(250);
        settings.max_backoff = Duration::from_secs(2);
        settings.verdict_grace = Duration::from_secs(5);
        let (reports, shown) = mpsc::channel(256);
        tokio::spawn(show_reports(shown, bars.clone(), format!("volunteer {i}")));
        let (stop, stopped) = oneshot::channel::<()>();
        let client = swarm.client.clone();
        let task = tokio::spawn(volunteer::run(
            swarm.key,
            swarm.client,
            swarm.events,
            store,
            settings,
            Some(reports),
            async move {
                let _ = stopped.await;
            },
        ));
        say(format!("volunteer {i} {}", client.local_peer_id()));
        volunteers.push(Volunteer { stop, task, client });
    }

    // The job owner submits examples/job.toml.
    let (job_path, held_out) = write_job(dir)?;
    let mut file = client::read_job_file(&job_path)?;
    if let Some(rounds) = config.rounds {
        file.rounds.count = Some(rounds);
        file.rounds.token_budget = None;
    }
    if let Some(steps) = config.inner_steps {
        file.inner.inner_steps = steps;
    }
    file.rounds.quorum = file.rounds.quorum.min(config.volunteers as u32).max(1);
    let owner_dir = dir.join("owner");
    std::fs::create_dir_all(&owner_dir)?;
    let owner_key = net::key(&owner_dir)?;
    let owner_store = BlobStore::open(owner_dir.join("blobs"), MAX_BLOB_BYTES)?;
    let owner = net::connect(
        Some(owner_key.clone()),
        (coordinator_id, coordinator_addr.clone()),
        Duration::from_secs(30),
    )
    .await?;
    transfer::spawn_server(&owner.client, owner_store.clone(), 4).await?;
    let job_dir = job_path.parent().unwrap_or(dir).to_owned();
    let submitted = client::submit(
        &owner.client,
        &owner_store,
        &owner_key,
        coordinator_id,
        &file,
        &job_dir,
    )
    .await?;
    let job = submitted.job_id;
    say(format!(
        "submitted job {} ({} rounds of {} steps per lease, quorum {})",
        &hex(&job)[..16],
        file.rounds.count.unwrap_or(0),
        file.inner.inner_steps,
        file.rounds.quorum
    ));
    client::wait_prepared(
        &owner.client,
        coordinator_id,
        &job,
        Duration::from_secs(300),
    )
    .await?;

    // Follow the job: each new version and each verdict, once.
    let status = follow(config, &bars, &owner.client, coordinator_id, &job, started).await;

    for v in volunteers {
        let _ = v.stop.send(());
        match tokio::time::timeout(Duration::from_secs(30), v.task).await {
            Ok(Ok(Err(e))) => tracing::warn!("a volunteer stopped with an error: {e:#}"),
            Ok(Err(e)) => tracing::warn!("a volunteer task failed: {e}"),
            _ => {}
        }
        let _ = v.client.shutdown().await;
    }
    let status = status?;

    // The module user pulls the result and compares it with the base.
    let module_dir = dir.join("module");
    let user_dir = dir.join("user");
    let user_store = BlobStore::open(user_dir.join("blobs"), MAX_BLOB_BYTES)?;
    let pulled = client::pull(
        &owner.client,
        &user_store,
        &user_dir,
        coordinator_id,
        &submitted.module,
        None,
        &module_dir,
        false,
    )
    .await?;
    say(format!(
        "pulled {}@{} into {}",
        pulled.manifest.module,
        pulled.manifest.version,
        module_dir.display()
    ));
    let points: Vec<(u64, f64)> = status
        .versions
        .iter()
        .filter_map(|v| v.metrics.as_ref().map(|m| (v.version, m.eval_loss)))
        .collect();
    if let Err(e) = crate::plot::eval_loss_svg(&dir.join("loss.svg"), "shout: eval loss", &points) {
        tracing::warn!("no loss plot: {e:#}");
    }
    let _ = owner.client.shutdown().await;
    let _ = stop_coordinator.send(());
    if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(30), coordinator_task).await {
        tracing::warn!("the coordinator stopped with an error: {e}");
    }
    let _ = coordinator_client.shutdown().await;

    let module_dir_for_eval = module_dir.clone();
    let threads = (config.threads_per_volunteer * config.volunteers).max(1);
    let (base_answers, module_answers) =
        tokio::task::spawn_blocking(move || side_by_side(&module_dir_for_eval, &held_out, threads))
            .await??;
    Ok(DemoReport {
        job_id: job,
        status,
        module_dir,
        base_exact_match: exact_match(&base_answers),
        module_exact_match: exact_match(&module_answers),
        answers: base_answers.into_iter().zip(module_answers).collect(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Polls the job until it ends, printing each new version and verdict.
async fn follow(
    config: &DemoConfig,
    bars: &MultiProgress,
    client: &swarmtune_protocol::net::Client,
    coordinator: PeerId,
    job: &[u8; 32],
    started: Instant,
) -> anyhow::Result<v1::JobStatus> {
    let mut versions_seen = 0u64;
    let mut verdicts_seen = std::collections::HashSet::new();
    loop {
        anyhow::ensure!(
            started.elapsed() < config.timeout,
            "the demo did not finish in {} s",
            config.timeout.as_secs()
        );
        let mut status = client::job_status(client, coordinator, job).await?;
        // The wire lists versions newest first; the story goes oldest first.
        status.versions.sort_by_key(|v| v.version);
        for v in &status.recent_verdicts {
            if verdicts_seen.insert(v.lease_id) && config.show {
                let peer = PeerId::from_bytes(&v.peer_id)
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                let short = &peer[peer.len().saturating_sub(6)..];
                let what = if v.outcome() == v1::VerdictOutcome::Accepted {
                    format!("accepted ({} segment(s) replayed)", v.segments_checked)
                } else {
                    format!("rejected: {}", v.message)
                };
                say(
                    bars,
                    format!(
                        "coordinator: round {} lease {} from ..{short}: {what}",
                        v.round, v.lease_id
                    ),
                );
            }
        }
        let seen = versions_seen;
        for v in status.versions.iter().filter(|v| v.version > seen) {
            versions_seen = v.version;
            if config.show {
                let m = v.metrics.unwrap_or_default();
                let exact = if m.exact_match_examples > 0 {
                    format!(", exact match {:.0}%", 100.0 * m.exact_match)
                } else {
                    String::new()
                };
                let from = if v.round == 0 {
                    "the starting adapter".to_owned()
                } else {
                    format!("round {}", v.round)
                };
                say(
                    bars,
                    format!(
                        "coordinator: version {} from {from}: eval loss {:.4}{exact}",
                        v.version, m.eval_loss
                    ),
                );
            }
        }
        let state = status.summary.as_ref().map(|s| s.state());
        match state {
            Some(v1::JobState::Completed) => return Ok(status),
            Some(v1::JobState::Failed | v1::JobState::Cancelled) => anyhow::bail!(
                "the job ended: {}",
                status.summary.as_ref().map_or("", |s| s.message.as_str())
            ),
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// The base's and the module's answers to `held_out`.
fn side_by_side(
    module_dir: &Path,
    held_out: &[Example],
    threads: usize,
) -> anyhow::Result<(Vec<Answer>, Vec<Answer>)> {
    let pool = swarmtune_trainer::device::ThreadPool::new(threads)?;
    pool.install(|| {
        let base_dir = crate::cmd::model_dir(None)?;
        let device = swarmtune_trainer::device::DeviceKind::Cpu.device()?;
        let base = CausalLm::load(&base_dir, &device)?;
        let (tokenizer, _) =
            swarmtune_trainer::data::load_tokenizer_with_hash(base_dir.join("tokenizer.json"))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        let eos = base.config().eos_token_id();
        let plain = answers(
            &base,
            ForwardOptions::default(),
            &tokenizer,
            held_out,
            eos,
            4,
        )?;
        let module = Adapter::load(module_dir)?;
        let lora = DeviceLora::new(&module, &base.lora_sites(&module.config), &device, false, 0)?;
        let tuned = answers(
            &base,
            ForwardOptions { lora: Some(&lora) },
            &tokenizer,
            held_out,
            eos,
            4,
        )?;
        Ok((plain, tuned))
    })
}

/// Prints the side-by-side table and the verdict of the run.
pub fn print_report(report: &DemoReport) {
    println!();
    println!("{:<44} {:<30} {:<30}", "held-out prompt", "base", "module");
    for (base, module) in report.answers.iter().take(10) {
        println!(
            "{:<44} {:<30} {:<30}",
            base.prompt,
            base.produced.trim(),
            module.produced.trim()
        );
    }
    println!();
    println!(
        "exact match on {} held-out prompts: base {:.0}%, module {:.0}%",
        report.answers.len(),
        100.0 * report.base_exact_match,
        100.0 * report.module_exact_match
    );
    if let Some(first) = report.status.versions.first()
        && let Some(last) = report.status.versions.last()
    {
        let loss = |v: &v1::VersionSummary| v.metrics.as_ref().map_or(f64::NAN, |m| m.eval_loss);
        println!(
            "eval loss: version {} {:.4} -> version {} {:.4}",
            first.version,
            loss(first),
            last.version,
            loss(last)
        );
    }
    println!("finished in {:.0} s", report.seconds);
}
