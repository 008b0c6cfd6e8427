//! The coordinator service on a real swarm (the memory transport): a job owner submits the
//! example job over `/swarmtune/job/1` and the coordinator fetches its dataset from the owner;
//! volunteers take leases over `/swarmtune/lease/1`, fetch what a lease names through the
//! DHT, and deliver deltas over `/swarmtune/delta/1`. An honest volunteer is challenged over
//! the network and accepted; one whose delta blob is garbage is rejected; both get their
//! verdicts as requests. A restart of the coordinator on the same data dir keeps everything.
//! Every wait is bounded.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol as AddrPart;
use libp2p_identity::{Keypair, PeerId};
use swarmtune_coordinator::engine::{Config, Coordinator};
use swarmtune_coordinator::service::{self, ServiceConfig};
use swarmtune_coordinator::spec::parse_job_file;
use swarmtune_protocol::net::transfer::{self, FetchConfig};
use swarmtune_protocol::net::{Client, NetConfig, NetEvent, Request, spawn_memory};
use swarmtune_protocol::signed::{self, sign};
use swarmtune_protocol::{BlobStore, ContentId, PROTOCOL_VERSION, v1};
use swarmtune_trainer::checkpoint::safetensors_from_bytes;
use swarmtune_trainer::data::{Shard, ShardLimits};
use swarmtune_trainer::delta::{DeltaEncoding, encode};
use swarmtune_trainer::device::DeviceKind;

use swarmtune_trainer::model::CausalLm;
use swarmtune_trainer::train::TrainOutcome;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;

const STEP: Duration = Duration::from_secs(120);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match timeout(STEP, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// A peer on the memory transport with a blob store it serves.
struct Peer {
    key: Keypair,
    client: Client,
    events: mpsc::Receiver<NetEvent>,
    store: BlobStore,
    _dir: tempfile::TempDir,
}

async fn peer(bootstrap: &Multiaddr) -> Peer {
    let key = Keypair::generate_ed25519();
    let config = NetConfig {
        bootstrap: vec![bootstrap.clone()],
        ..NetConfig::for_tests()
    };
    let (client, events) = spawn_memory(key.clone(), config).unwrap();
    within("listen", client.listen_on("/memory/0".parse().unwrap()))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), 1 << 30).unwrap();
    transfer::spawn_server(&client, store.clone(), 4)
        .await
        .unwrap();
    Peer {
        key,
        client,
        events,
        store,
        _dir: dir,
    }
}

/// A running coordinator: its swarm, its service task and the switch that stops it.
struct Running {
    client: Client,
    addr: Multiaddr,
    engine: Arc<Coordinator>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), service::ServiceError>>,
}

async fn start_coordinator(dir: &Path, key: &Keypair, port: u64) -> Running {
    let engine = Arc::new(
        Coordinator::open(
            Config::new(dir),
            key.clone(),
            DeviceKind::Cpu.device().unwrap(),
            "flex",
            rayon::current_num_threads(),
        )
        .unwrap(),
    );
    let (client, events) = spawn_memory(key.clone(), NetConfig::for_tests()).unwrap();
    let addr = within(
        "listen",
        client.listen_on(format!("/memory/{port}").parse().unwrap()),
    )
    .await
    .unwrap()
    .with(AddrPart::P2p(client.local_peer_id()));
    let (stop, stopped) = oneshot::channel();
    let config = ServiceConfig {
        tick: Duration::from_millis(200),
        fetch_timeout: Duration::from_secs(60),
        challenge_timeout: Duration::from_secs(60),
        ..ServiceConfig::default()
    };
    let task = tokio::spawn(service::run(
        engine.clone(),
        client.clone(),
        events,
        config,
        async move {
            let _ = stopped.await;
        },
    ));
    Running {
        client,
        addr,
        engine,
        stop,
        task,
    }
}

async fn status(
    client: &Client,
    coordinator: PeerId,
    body: v1::status_request::Body,
) -> v1::StatusResponse {
    within(
        "status",
        client.request(
            coordinator,
            v1::StatusRequest {
                protocol_version: PROTOCOL_VERSION,
                body: Some(body),
            },
        ),
    )
    .await
    .unwrap()
}

async fn job_status(client: &Client, coordinator: PeerId, job: &[u8]) -> v1::JobStatus {
    let answer = status(
        client,
        coordinator,
        v1::status_request::Body::GetJobStatus(v1::GetJobStatus {
            job_id: job.to_vec(),
        }),
    )
    .await;
    match answer.body {
        Some(v1::status_response::Body::JobStatus(s)) => s,
        other => panic!("{other:?}"),
    }
}

/// Polls until `check` holds of the job's status (at most `STEP`).
async fn wait_for(
    client: &Client,
    coordinator: PeerId,
    job: &[u8],
    what: &str,
    check: impl Fn(&v1::JobStatus) -> bool,
) -> v1::JobStatus {
    within(what, async {
        loop {
            let s = job_status(client, coordinator, job).await;
            if check(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
}

fn dataset() -> String {
    let (train, _) = swarmtune_trainer::builtin::skill::splits(7, 400, 10);
    train
        .iter()
        .map(|e| match e {
            swarmtune_trainer::data::Example::PromptCompletion { prompt, completion } => {
                format!(
                    "{}\n",
                    serde_json::json!({"prompt": prompt, "completion": completion})
                )
            }
            _ => unreachable!(),
        })
        .collect()
}

/// Fetches what `lease` names over the network and trains it for real.
async fn train(volunteer: &Peer, model: &CausalLm, lease: &v1::Lease) -> TrainOutcome {
    let fetch = |c: &v1::ContentId| {
        let id = ContentId::try_from(c).unwrap();
        let (client, store) = (volunteer.client.clone(), volunteer.store.clone());
        async move {
            within(
                "fetch a lease blob",
                transfer::fetch(&client, &store, id, &FetchConfig::default(), None),
            )
            .await
            .unwrap();
            store.read(&id).unwrap()
        }
    };
    let start = safetensors_from_bytes(
        &fetch(lease.start_adapter.as_ref().unwrap()).await,
        Path::new("start"),
    )
    .unwrap()
    .0;
    let mut shards = Vec::new();
    for c in &lease.shards {
        shards.push(Shard::decode(&fetch(c).await, &ShardLimits::default()).unwrap());
    }
    swarmtune_coordinator::adversary::sim::train_lease(model, lease, &shards, start).unwrap()
}

async fn ask_lease(volunteer: &Peer, coordinator: PeerId) -> v1::Lease {
    let answer = within(
        "lease",
        volunteer.client.request(
            coordinator,
            v1::LeaseRequest {
                protocol_version: PROTOCOL_VERSION,
                body: Some(v1::lease_request::Body::RequestLease(v1::RequestLease {
                    job_id: Vec::new(),
                    capabilities: Some(v1::PeerCapabilities {
                        tokens_per_second: 2_000.0,
                        ..Default::default()
                    }),
                })),
            },
        ),
    )
    .await
    .unwrap();
    match answer.body {
        Some(v1::lease_response::Body::LeaseGranted(g)) => g.lease.unwrap(),
        other => panic!("{other:?}"),
    }
}

/// Delivers `delta_bytes` as the delta of `lease` (provided from the volunteer's store).
async fn deliver(
    volunteer: &Peer,
    coordinator: PeerId,
    lease: &v1::Lease,
    outcome: &TrainOutcome,
    delta_bytes: &[u8],
) -> v1::delta_response::Body {
    let delta = volunteer.store.put_bytes(delta_bytes).unwrap();
    volunteer
        .client
        .start_providing(delta.as_bytes().to_vec())
        .await
        .unwrap();
    let envelope = swarmtune_coordinator::verify::delta_envelope(
        lease,
        outcome,
        delta,
        delta_bytes.len() as u64,
    );
    let signed = sign(&volunteer.key, &envelope, service::now_ms()).unwrap();
    let answer = within(
        "deliver",
        volunteer.client.request(
            coordinator,
            v1::DeltaRequest {
                protocol_version: PROTOCOL_VERSION,
                body: Some(v1::delta_request::Body::SubmitDelta(v1::SubmitDelta {
                    envelope: Some(signed),
                })),
            },
        ),
    )
    .await
    .unwrap();
    answer.body.unwrap()
}

/// Serves the coordinator's requests about `outcome` (challenges from the kept states) until
/// the verdict comes; returns it and the number of challenges answered.
async fn await_verdict(
    volunteer: &mut Peer,
    outcome: &TrainOutcome,
) -> (v1::VerificationVerdict, usize) {
    within("the verdict", async {
        let mut challenges = 0;
        loop {
            let Some(event) = volunteer.events.recv().await else {
                panic!("the volunteer's swarm stopped");
            };
            let NetEvent::Request(inbound) = event else {
                continue;
            };
            let Request::Delta(request) = inbound.request else {
                continue;
            };
            match request.body {
                Some(v1::delta_request::Body::SegmentChallenge(challenge)) => {
                    challenges += 1;
                    let states = answer(volunteer, outcome, &challenge).await;
                    volunteer
                        .client
                        .respond(
                            inbound.responder,
                            v1::DeltaResponse {
                                protocol_version: PROTOCOL_VERSION,
                                body: Some(v1::delta_response::Body::SegmentStates(states)),
                            },
                        )
                        .await
                        .unwrap();
                }
                Some(v1::delta_request::Body::Verdict(verdict)) => {
                    volunteer
                        .client
                        .respond(
                            inbound.responder,
                            v1::DeltaResponse {
                                protocol_version: PROTOCOL_VERSION,
                                body: Some(v1::delta_response::Body::VerdictReceived(
                                    v1::VerdictReceived {
                                        lease_id: verdict.lease_id,
                                    },
                                )),
                            },
                        )
                        .await
                        .unwrap();
                    return (verdict, challenges);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
}

/// The states a challenge asks for, put in the volunteer's store and provided.
async fn answer(
    volunteer: &Peer,
    outcome: &TrainOutcome,
    challenge: &v1::SegmentChallenge,
) -> v1::SegmentStates {
    let mut states = Vec::new();
    for s in &challenge.segments {
        let put = |step: u64| {
            let state = outcome.snapshots.iter().find(|x| x.step() == step).unwrap();
            volunteer
                .store
                .put_bytes(&state.to_bytes().unwrap())
                .unwrap()
        };
        let (start, end) = (put(s.start_step), put(s.end_step));
        for id in [start, end] {
            volunteer
                .client
                .start_providing(id.as_bytes().to_vec())
                .await
                .unwrap();
        }
        let claimed = outcome
            .commitments
            .iter()
            .find(|c| c.step == s.end_step)
            .unwrap()
            .state_hash
            .to_vec();
        states.push(v1::SegmentState {
            segment: Some(*s),
            start_state: Some(start.to_proto()),
            claimed_end_hash: claimed,
            end_state: Some(end.to_proto()),
        });
    }
    v1::SegmentStates {
        lease_id: challenge.lease_id,
        states,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_over_the_network_and_survives_a_coordinator_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key = Keypair::generate_ed25519();
    let port = 1 + rand::random::<u64>() % (1 << 40) * 2;
    let coordinator = start_coordinator(&dir.path().join("coordinator"), &key, port).await;
    let coordinator_id = key.public().to_peer_id();

    // The owner submits; the dataset stays with the owner, who serves it.
    let owner = peer(&coordinator.addr).await;
    let dataset = owner.store.put_bytes(dataset().as_bytes()).unwrap();
    owner
        .client
        .start_providing(dataset.as_bytes().to_vec())
        .await
        .unwrap();
    let mut file = parse_job_file(include_str!("../../examples/job.toml")).unwrap();
    file.inner.inner_steps = 10;
    file.inner.batch_size = 8;
    file.inner.micro_batch = Some(8);
    let spec = file.to_spec(&coordinator_id, dataset).unwrap();
    let submit = |spec: Option<v1::Signed>| v1::JobRequest {
        protocol_version: PROTOCOL_VERSION,
        body: Some(v1::job_request::Body::SubmitJob(v1::SubmitJob { spec })),
    };
    // A spec that is not signed by its sender's key is refused with the reason.
    let mut forged = sign(&owner.key, &spec, service::now_ms()).unwrap();
    forged.signature[0] ^= 1;
    let refused = within(
        "forged",
        owner.client.request(coordinator_id, submit(Some(forged))),
    )
    .await
    .unwrap();
    assert_eq!(
        refused.body.as_ref().and_then(|b| match b {
            v1::job_response::Body::Error(e) => Some(e.code()),
            _ => None,
        }),
        Some(v1::ErrorCode::BadSignature),
        "{refused:?}"
    );
    let signed_spec = sign(&owner.key, &spec, service::now_ms()).unwrap();
    let submitted = within(
        "submit",
        owner
            .client
            .request(coordinator_id, submit(Some(signed_spec))),
    )
    .await
    .unwrap();
    let Some(v1::job_response::Body::JobSubmitted(submitted)) = submitted.body else {
        panic!("{submitted:?}");
    };
    let job = submitted.job_id.clone();
    let running = wait_for(&owner.client, coordinator_id, &job, "the job to run", |s| {
        s.summary.as_ref().unwrap().state() == v1::JobState::Running
    })
    .await;
    assert_eq!(running.summary.as_ref().unwrap().latest_version, 1);
    // The first version is published, signed by the coordinator.
    let latest = status(
        &owner.client,
        coordinator_id,
        v1::status_request::Body::GetLatestVersion(v1::GetLatestVersion {
            module: "shout".into(),
        }),
    )
    .await;
    let Some(v1::status_response::Body::ModuleVersion(version)) = latest.body else {
        panic!("{latest:?}");
    };
    let manifest = signed::verify::<v1::ModuleManifest>(
        version.manifest.as_ref().unwrap(),
        Some(&coordinator_id),
        64 << 10,
    )
    .unwrap()
    .message;
    assert_eq!((manifest.module.as_str(), manifest.version), ("shout", 1));

    // Two volunteers: one honest, one whose delta blob is garbage.
    let base_dir = dir.path().join("volunteer-base");
    std::fs::create_dir_all(&base_dir).unwrap();
    swarmtune_trainer::builtin::base::write_to(&base_dir).unwrap();
    let model = CausalLm::load(&base_dir, &DeviceKind::Cpu.device().unwrap())
        .unwrap()
        .to_autodiff();
    let mut honest = peer(&coordinator.addr).await;
    let mut cheat = peer(&coordinator.addr).await;

    let lease = ask_lease(&honest, coordinator_id).await;
    let outcome = train(&honest, &model, &lease).await;
    let delta = encode(&outcome.delta, DeltaEncoding::Int8RowWise).unwrap();
    let receipt = deliver(&honest, coordinator_id, &lease, &outcome, &delta).await;
    assert!(
        matches!(receipt, v1::delta_response::Body::DeltaReceipt(_)),
        "{receipt:?}"
    );
    let (verdict, challenges) = await_verdict(&mut honest, &outcome).await;
    assert_eq!(
        verdict.outcome(),
        v1::VerdictOutcome::Accepted,
        "{verdict:?}"
    );
    // A new peer is on probation: always challenged, here over the network.
    assert_eq!(challenges, 1);

    let bad_lease = ask_lease(&cheat, coordinator_id).await;
    let bad_outcome = train(&cheat, &model, &bad_lease).await;
    let garbage: Vec<u8> = (0..delta.len()).map(|i| (i * 7 + 3) as u8).collect();
    let receipt = deliver(&cheat, coordinator_id, &bad_lease, &bad_outcome, &garbage).await;
    assert!(
        matches!(receipt, v1::delta_response::Body::DeltaReceipt(_)),
        "{receipt:?}"
    );
    let (verdict, _) = await_verdict(&mut cheat, &bad_outcome).await;
    assert_eq!(
        verdict.outcome(),
        v1::VerdictOutcome::Rejected,
        "{verdict:?}"
    );
    assert_eq!(
        verdict.reason(),
        v1::RejectReason::MalformedDelta,
        "{verdict:?}"
    );

    let before = job_status(&owner.client, coordinator_id, &job).await;
    assert_eq!(before.recent_verdicts.len(), 2, "{before:?}");
    assert_eq!(before.summary.as_ref().unwrap().round_accepted_deltas, 1);

    // Restart on the same data dir and key: the job, its version and verdicts are all there.
    coordinator.stop.send(()).unwrap();
    within("the service to stop", coordinator.task)
        .await
        .unwrap()
        .unwrap();
    coordinator.client.shutdown().await.unwrap();
    drop(coordinator.engine);
    // A new memory port: the old listener goes away with its event loop, in its own time.
    let again = start_coordinator(&dir.path().join("coordinator"), &key, port + 1).await;
    let owner_client = owner.client.clone();
    within(
        "redial",
        owner_client.dial(coordinator_id, again.addr.clone()),
    )
    .await
    .unwrap();
    let after = job_status(&owner_client, coordinator_id, &job).await;
    assert_eq!(after.summary, before.summary);
    assert_eq!(after.versions, before.versions);
    assert_eq!(after.recent_verdicts, before.recent_verdicts);
    let list = status(
        &owner_client,
        coordinator_id,
        v1::status_request::Body::ListJobs(v1::ListJobs {
            include_finished: true,
        }),
    )
    .await;
    let Some(v1::status_response::Body::JobList(list)) = list.body else {
        panic!("{list:?}");
    };
    assert_eq!(list.jobs.len(), 1);
    assert_eq!(list.jobs[0].job_id, job);
    drop(again);
}
