//! `swarmtune node`, `swarmtune coordinator` and `swarmtune id`: the long-running peers.

use std::path::Path;
use std::sync::Arc;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use libp2p::Multiaddr;
use libp2p_identity::PeerId;
use swarmtune_coordinator::engine::{Config, Coordinator};
use swarmtune_coordinator::service::{self, ServiceConfig};
use swarmtune_protocol::BlobStore;
use swarmtune_trainer::device::DeviceKind;
use tokio::sync::mpsc;

use crate::cli::{CoordinatorArgs, IdArgs, NodeArgs, SwarmArgs};
use crate::config::{self, FileConfig};
use crate::net;
use crate::volunteer::{self, Report, VolunteerConfig};

/// Largest blob a node stores.
pub const MAX_BLOB_BYTES: u64 = 16 << 30;

/// `swarmtune id`.
pub fn id(args: IdArgs) -> anyhow::Result<()> {
    let data_dir = config::data_dir(args.data.data_dir.as_deref())?;
    let key = net::key(&data_dir)?;
    println!("{}", key.public().to_peer_id());
    Ok(())
}

/// `swarmtune node`.
pub fn node(args: NodeArgs) -> anyhow::Result<()> {
    let data_dir = config::data_dir(args.data.data_dir.as_deref())?;
    let file = config::load(args.data.config.as_deref(), &data_dir)?;
    let (listen, bootstrap, mdns) = swarm_settings(&args.swarm, &file, 0)?;
    let mut settings = VolunteerConfig::new(&data_dir);
    settings.device = config::device(args.device, &file)?;
    settings.threads = args.threads.or(file.threads).unwrap_or(0);
    settings.max_memory_bytes = args
        .max_memory
        .or(file.max_memory_gb)
        .map_or(0, |gb| (gb * 1e9) as u64);
    settings.coordinators = bootstrap.iter().map(|(peer, _)| *peer).collect();
    runtime()?.block_on(async move {
        let key = net::key(&data_dir)?;
        let swarm = net::start(key, &listen, addrs(&bootstrap), mdns).await?;
        print_identity("volunteer", &swarm);
        let store = BlobStore::open(data_dir.join("blobs"), MAX_BLOB_BYTES)?;
        let (reports, shown) = mpsc::channel(256);
        let display = tokio::spawn(show_reports(shown, MultiProgress::new(), String::new()));
        let client = swarm.client.clone();
        let result = volunteer::run(
            swarm.key,
            swarm.client,
            swarm.events,
            store,
            settings,
            Some(reports),
            shutdown_signal(),
        )
        .await;
        let _ = client.shutdown().await;
        let _ = display.await;
        result
    })
}

/// `swarmtune coordinator`.
pub fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let data_dir = config::data_dir(args.data.data_dir.as_deref())?;
    let file = config::load(args.data.config.as_deref(), &data_dir)?;
    let (listen, bootstrap, mdns) = swarm_settings(&args.swarm, &file, 4001)?;
    let threads = args.threads.or(file.threads).unwrap_or(0);
    if threads > 0 {
        // The engine's replays and evaluations run on rayon's global pool.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
    }
    runtime()?.block_on(async move {
        let key = net::key(&data_dir)?;
        let engine = Arc::new(open_engine(&data_dir, key.clone())?);
        let swarm = net::start(key, &listen, addrs(&bootstrap), mdns).await?;
        print_identity("coordinator", &swarm);
        let client = swarm.client.clone();
        service::run(
            engine,
            swarm.client,
            swarm.events,
            ServiceConfig::default(),
            shutdown_signal(),
        )
        .await?;
        let _ = client.shutdown().await;
        Ok(())
    })
}

/// The coordinator's engine on `data_dir`, replaying on the CPU.
pub fn open_engine(data_dir: &Path, key: libp2p_identity::Keypair) -> anyhow::Result<Coordinator> {
    Ok(Coordinator::open(
        Config::new(data_dir),
        key,
        DeviceKind::Cpu.device()?,
        DeviceKind::Cpu.backend_name(),
        rayon::current_num_threads(),
    )?)
}

type Settings = (Vec<Multiaddr>, Vec<(PeerId, Multiaddr)>, bool);

/// Listen addresses, bootstrap peers and mDNS from flags, else the file, else defaults.
fn swarm_settings(flags: &SwarmArgs, file: &FileConfig, port: u16) -> anyhow::Result<Settings> {
    let listen = if !flags.listen.is_empty() {
        &flags.listen
    } else {
        &file.listen
    };
    let listen = if listen.is_empty() {
        net::default_listen(port)
    } else {
        listen
            .iter()
            .map(|a| config::multiaddr(a, "--listen"))
            .collect::<Result<_, _>>()?
    };
    let bootstrap = if !flags.bootstrap.is_empty() {
        &flags.bootstrap
    } else {
        &file.bootstrap
    };
    let bootstrap = bootstrap
        .iter()
        .map(|a| config::peer_addr(a, "--bootstrap"))
        .collect::<Result<_, _>>()?;
    let mdns = !flags.no_mdns && file.mdns.unwrap_or(true);
    Ok((listen, bootstrap, mdns))
}

fn addrs(peers: &[(PeerId, Multiaddr)]) -> Vec<Multiaddr> {
    peers.iter().map(|(_, a)| a.clone()).collect()
}

/// Prints the peer id and full addresses, one per line, for people and scripts.
pub fn print_identity(role: &str, swarm: &net::Swarm) {
    println!("{role} {}", swarm.client.local_peer_id());
    for addr in &swarm.addrs {
        println!("listening on {addr}");
    }
}

/// A multi-threaded tokio runtime.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Prints a line above the progress bars, or plainly when they are not drawn (not a
/// terminal).
pub fn say(bars: &MultiProgress, line: String) {
    if bars.is_hidden() {
        println!("{line}");
    } else {
        let _ = bars.println(line);
    }
}

/// Draws a volunteer's reports: a bar per lease, a line per verdict.
pub async fn show_reports(mut reports: mpsc::Receiver<Report>, bars: MultiProgress, name: String) {
    let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps  {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let mut bar: Option<ProgressBar> = None;
    let prefix = |lease: u64| {
        if name.is_empty() {
            format!("lease {lease}")
        } else {
            format!("{name} lease {lease}")
        }
    };
    while let Some(report) = reports.recv().await {
        match report {
            Report::Leased {
                lease_id,
                module,
                round,
                steps,
            } => {
                let b = bars.add(ProgressBar::new(steps));
                b.set_style(style.clone());
                b.set_prefix(prefix(lease_id));
                b.set_message(format!("{module}, round {round}: fetching"));
                if let Some(old) = bar.replace(b) {
                    old.finish_and_clear();
                }
            }
            Report::Step {
                lease_id,
                step,
                total,
                loss,
            } => {
                if let Some(b) = &bar {
                    b.set_length(total);
                    b.set_position(step);
                    b.set_message(format!("loss {loss:.3}"));
                }
                // Without a terminal there is no bar: a line every tenth of the lease.
                if bars.is_hidden() && (step % total.div_ceil(10).max(1) == 0 || step == total) {
                    say(
                        &bars,
                        format!("{}: step {step}/{total}, loss {loss:.3}", prefix(lease_id)),
                    );
                }
            }
            Report::Delivered {
                lease_id,
                loss_before,
                loss_after,
                seconds,
            } => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                say(
                    &bars,
                    format!(
                        "{}: trained in {seconds:.0} s, loss {loss_before:.3} -> {loss_after:.3}; delivered",
                        prefix(lease_id)
                    ),
                );
            }
            Report::Challenged { lease_id, segments } => {
                say(
                    &bars,
                    format!(
                        "{}: challenged, {segments} segment(s) to prove",
                        prefix(lease_id)
                    ),
                );
            }
            Report::Verdict {
                lease_id, message, ..
            } => {
                say(&bars, format!("{}: {message}", prefix(lease_id)));
            }
            Report::Dropped { lease_id, reason } => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                say(&bars, format!("{}: dropped: {reason}", prefix(lease_id)));
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}
