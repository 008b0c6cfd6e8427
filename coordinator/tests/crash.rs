//! `kill -9` at any point of a round, then a restart, loses nothing (issue 6, point 6).
//!
//! The test runs its own binary again as a child process ([`crash_child`]) that hosts a
//! coordinator engine on a data directory and drives a two-round job with two in-process
//! volunteers, printing an `EVENT` line after every change the engine committed (job
//! submitted, version published, lease granted, delta delivered, challenged, accepted, round
//! closed). The parent reads those lines and SIGKILLs the child at a different point each time
//! (while it prepares the job, after a lease grant, a delivery, a challenge, an acceptance, in
//! the middle of a merge, right after a publish, in both rounds), then opens the same directory
//! and checks that everything the children reported is there: the job, every lease, delivered
//! and accepted delta, and every version, its manifest signed by the coordinator and its
//! adapter blob matching its hash. The next child continues from the directory, and the last one runs the job to completion, after which
//! every accepted delta is among the contributors of its round's version and the tokens merged
//! are exactly the accepted deltas' tokens.
//!
//! The volunteers' keys are fixed, so a restarted child finds their leases and deltas in the
//! store, as real volunteers (separate processes that survive the coordinator) would still
//! hold them; it recomputes their training, which is bitwise the same on the same machine.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{
    Volunteer, answer_from, ask, fixed_key as key, open_coordinator, submit_job, volunteer_base,
};
use libp2p_identity::Keypair;
use prost::Message;
use swarmtune_coordinator::engine::{Coordinator, Next, hex};
use swarmtune_coordinator::leases::LeaseAnswer;
use swarmtune_coordinator::records::{
    DeltaRecord, DeltaStatus, JobRecord, JobState, LeaseRecord, LeaseState,
};
use swarmtune_coordinator::registry;
use swarmtune_coordinator::spec::JobFile;
use swarmtune_coordinator::store::{DELTAS, JOBS, LEASES, u64_key};
use swarmtune_protocol::{ContentId, signed, v1};
use swarmtune_trainer::train::TrainOutcome;

/// The child's test name, and the environment that makes it run (and says where and when).
const CHILD: &str = "crash_child";
const DIR_VAR: &str = "SWARMTUNE_CRASH_DIR";
const NOW_VAR: &str = "SWARMTUNE_CRASH_NOW";
/// Longest a child may take to reach its kill point (or to finish).
const CHILD_LIMIT: Duration = Duration::from_secs(300);

fn coordinator_key() -> Keypair {
    key(1)
}

/// The example job: two rounds of two 4-step leases, each volunteer's first delta replayed,
/// and a deadline no test reaches.
fn job_file() -> JobFile {
    let mut file = common::job_file();
    file.inner.inner_steps = 4;
    file.inner.commit_every = 2;
    file.rounds.count = Some(2);
    file.rounds.quorum = 2;
    file.rounds.timeout_secs = 3_600;
    file.verification.probation_leases = 1;
    file.verification.segments_per_challenge = 1;
    file.verification.challenge_probability = 0.0;
    file
}

// ---------------------------------------------------------------------------------------------
// The child: a coordinator and its volunteers, resuming from whatever the directory holds.
// ---------------------------------------------------------------------------------------------

/// The child process's work; does nothing unless the parent started it.
#[test]
#[ignore = "the crash test runs it as its child process"]
fn crash_child() {
    let Ok(dir) = std::env::var(DIR_VAR) else {
        return;
    };
    let now = std::env::var(NOW_VAR).unwrap().parse().unwrap();
    Child::start(Path::new(&dir), now).run();
}

struct Child {
    coordinator: Coordinator,
    volunteers: Vec<Volunteer>,
    now: u64,
    reported_version: u64,
}

impl Child {
    fn start(dir: &Path, now: u64) -> Self {
        let coordinator = open_coordinator(dir, coordinator_key());
        let base = volunteer_base(dir);
        let volunteers = (0..2).map(|i| Volunteer::new(key(10 + i), &base)).collect();
        Self {
            coordinator,
            volunteers,
            now,
            reported_version: 0,
        }
    }

    /// Prints that a change was committed; the parent may kill this process from now on.
    fn event(&self, what: std::fmt::Arguments<'_>) {
        println!("EVENT {} {what}", self.now);
    }

    fn tick(&mut self) -> u64 {
        self.now += 1_000;
        self.now
    }

    fn run(mut self) {
        // The job is submitted once: a signed envelope carries a random nonce, so submitting
        // again would be a second job (a client's retry resends the same envelope).
        let jobs: Vec<(Vec<u8>, JobRecord)> = self
            .coordinator
            .store()
            .read(|r| r.scan(JOBS, &[]))
            .unwrap();
        let job_id = match jobs.as_slice() {
            [] => submit_job(&self.coordinator, &key(2), &job_file(), 1_000).0,
            [(_, job)] => job.id,
            _ => panic!("{} jobs", jobs.len()),
        };
        self.event(format_args!("job {}", hex(&job_id)));
        for id in self.coordinator.preparing_jobs().unwrap() {
            let now = self.tick();
            self.coordinator.prepare(&id, now).unwrap();
            self.event(format_args!("prepared {}", hex(&id)));
        }
        self.report_versions();
        loop {
            let job = self.coordinator.job(&job_id).unwrap();
            match job.state {
                JobState::Completed => break,
                JobState::Running => {}
                other => panic!("the job is {other:?}: {}", job.message),
            }
            for i in 0..self.volunteers.len() {
                self.work(i, &job_id);
            }
            self.event(format_args!("closing {}", job.round));
            let now = self.tick();
            assert_eq!(self.coordinator.tick(now).unwrap(), vec![job_id]);
            self.report_versions();
            let job = self.coordinator.job(&job_id).unwrap();
            self.event(format_args!("closed {} {}", job.round, job.latest_version));
        }
        self.event(format_args!("completed"));
    }

    /// Prints every version not reported yet by this process.
    fn report_versions(&mut self) {
        let module = self
            .coordinator
            .store()
            .read(|r| registry::module(r, "shout"))
            .unwrap();
        let latest = module.map_or(0, |m| m.latest);
        for version in self.reported_version + 1..=latest {
            let record = self
                .coordinator
                .store()
                .read(|r| registry::version_record(r, "shout", version))
                .unwrap()
                .unwrap();
            self.event(format_args!("version {version} {}", hex(&record.adapter)));
        }
        self.reported_version = latest;
    }

    /// Volunteer `i`'s work of the open round, from wherever it stands, to an accepted delta.
    fn work(&mut self, i: usize, job_id: &[u8; 32]) {
        let job = self.coordinator.job(job_id).unwrap();
        let holder = self.volunteers[i].peer().to_bytes();
        let leases: Vec<(Vec<u8>, LeaseRecord)> = self
            .coordinator
            .store()
            .read(|r| r.scan(LEASES, &[]))
            .unwrap();
        // The newest (keys are big-endian lease ids).
        let held = leases
            .into_iter()
            .map(|(_, l)| l)
            .filter(|l| l.job == *job_id && l.round == job.round && l.holder == holder)
            .rfind(|l| matches!(l.state, LeaseState::Active | LeaseState::Delivered));
        let lease = match held {
            Some(record) => v1::Lease::decode(record.lease.as_slice()).unwrap(),
            None => {
                let now = self.tick();
                let peer = self.volunteers[i].peer();
                match ask(&self.coordinator, &peer, now).unwrap() {
                    LeaseAnswer::Granted(lease) => {
                        self.event(format_args!("lease {}", lease.lease_id));
                        *lease
                    }
                    LeaseAnswer::NoWork(why) => panic!("no work for volunteer {i}: {why:?}"),
                }
            }
        };
        let id = lease.lease_id;
        let delta: Option<DeltaRecord> = self
            .coordinator
            .store()
            .read(|r| r.get(DELTAS, &u64_key(id)))
            .unwrap();
        let mut outcome = None;
        let status = match delta {
            Some(d) => d.status,
            None => {
                let now = self.tick();
                let v = &self.volunteers[i];
                let trained = v.train(&self.coordinator, &lease);
                let envelope = v.deliver(&self.coordinator, &lease, &trained, now);
                let answer = self
                    .coordinator
                    .submit_delta(&v.peer(), &envelope, now)
                    .unwrap();
                assert!(
                    matches!(answer, v1::delta_response::Body::DeltaReceipt(_)),
                    "{answer:?}"
                );
                outcome = Some(trained);
                self.event(format_args!("delivered {id}"));
                DeltaStatus::Pending
            }
        };
        let segments = match status {
            DeltaStatus::Accepted => return,
            DeltaStatus::Rejected => panic!("volunteer {i}'s delta of lease {id} was rejected"),
            DeltaStatus::Pending => {
                let now = self.tick();
                match self.coordinator.verify(id, true, now).unwrap() {
                    Next::Verdict(verdict) => {
                        self.accepted(&verdict);
                        return;
                    }
                    Next::Challenge(challenge) => {
                        self.event(format_args!("challenged {id}"));
                        challenge.segments
                    }
                    Next::AwaitingTwin => panic!("no redundancy in this job"),
                }
            }
            DeltaStatus::Challenged { segments, .. } => segments
                .iter()
                .map(|s| v1::Segment::decode(s.as_slice()).unwrap())
                .collect(),
            DeltaStatus::AwaitingTwin { .. } => panic!("no redundancy in this job"),
        };
        let v = &self.volunteers[i];
        let outcome: TrainOutcome = outcome.unwrap_or_else(|| v.train(&self.coordinator, &lease));
        let challenge = v1::SegmentChallenge {
            lease_id: id,
            segments,
            respond_by_unix_ms: 0,
        };
        let answer = answer_from(&self.coordinator, &outcome.snapshots, &challenge);
        let now = self.tick();
        match self.coordinator.answer_challenge(id, &answer, now).unwrap() {
            Next::Verdict(verdict) => self.accepted(&verdict),
            other => panic!("lease {id}: {other:?}"),
        }
    }

    fn accepted(&self, verdict: &v1::VerificationVerdict) {
        assert_eq!(
            verdict.outcome(),
            v1::VerdictOutcome::Accepted,
            "{verdict:?}"
        );
        self.event(format_args!("accepted {}", verdict.lease_id));
    }
}

// ---------------------------------------------------------------------------------------------
// The parent: kill, restart, check.
// ---------------------------------------------------------------------------------------------

/// What the children reported as committed.
#[derive(Default, Debug)]
struct Reported {
    jobs: BTreeSet<String>,
    versions: BTreeMap<u64, String>,
    leases: BTreeSet<u64>,
    delivered: BTreeSet<u64>,
    accepted: BTreeSet<u64>,
    completed: bool,
    /// The clock of the last event.
    now: u64,
}

impl Reported {
    fn record(&mut self, line: &str) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (now, kind, args) = match words.as_slice() {
            ["EVENT", now, kind, args @ ..] => (now.parse::<u64>().unwrap(), *kind, args),
            _ => return,
        };
        eprintln!("child: {line}");
        self.now = self.now.max(now);
        let number = |i: usize| args[i].parse::<u64>().unwrap();
        match kind {
            "job" => {
                self.jobs.insert(args[0].to_owned());
            }
            "version" => {
                let adapter = args[1].to_owned();
                let known = self.versions.entry(number(0)).or_insert(adapter.clone());
                assert_eq!(*known, adapter, "version {} changed its adapter", args[0]);
            }
            "lease" => {
                self.leases.insert(number(0));
            }
            "delivered" => {
                self.delivered.insert(number(0));
            }
            "accepted" => {
                self.accepted.insert(number(0));
            }
            "completed" => self.completed = true,
            _ => {}
        }
    }
}

/// Where the parent kills a child: after the first event of this kind.
#[derive(Clone, Copy, Debug)]
enum Kill {
    After(&'static str),
    Never,
}

/// Runs a child on `dir` from `now` until `kill` (killing it) or its end; records its events.
fn run_child(dir: &Path, now: u64, kill: Kill, reported: &mut Reported) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([CHILD, "--exact", "--nocapture", "--include-ignored"])
        .env(DIR_VAR, dir)
        .env(NOW_VAR, now.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, events) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + CHILD_LIMIT;
    let mut killed = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(line) => {
                reported.record(&line);
                if let Kill::After(kind) = kill
                    && line.split_whitespace().nth(2) == Some(kind)
                {
                    // SIGKILL: no destructor, no flush, no transaction rollback runs.
                    child.kill().unwrap();
                    killed = true;
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("the child did not reach {kill:?} within {CHILD_LIMIT:?}");
            }
        }
    }
    let status = child.wait().unwrap();
    // What it printed before it died was committed too.
    for line in events.iter() {
        reported.record(&line);
    }
    reader.join().unwrap();
    match kill {
        Kill::After(kind) => assert!(killed, "the child ended ({status}) before any {kind}"),
        Kill::Never => assert!(status.success(), "the child failed: {status}"),
    }
}

/// Opens `dir` and checks that everything the children reported is there.
fn check_reported(dir: &Path, reported: &Reported) -> Coordinator {
    let c = open_coordinator(dir, coordinator_key());
    let store = c.store();
    for job in &reported.jobs {
        let job = c.job(&unhex(job)).unwrap();
        assert!(
            matches!(
                job.state,
                JobState::Preparing | JobState::Running | JobState::Completed
            ),
            "{job:?}"
        );
        let latest = reported.versions.keys().max().copied().unwrap_or(0);
        assert!(job.latest_version >= latest, "{job:?}");
    }
    for (version, adapter) in &reported.versions {
        let record = store
            .read(|r| registry::version_record(r, "shout", *version))
            .unwrap()
            .unwrap_or_else(|| panic!("version {version} is lost"));
        assert_eq!(&hex(&record.adapter), adapter, "version {version}");
        let manifest = v1::Signed::decode(record.signed.as_slice()).unwrap();
        let manifest = signed::verify::<v1::ModuleManifest>(&manifest, Some(&c.peer_id()), 1 << 20)
            .unwrap()
            .message;
        assert_eq!(manifest.version, *version);
        // The blob store checks the bytes against their hash.
        c.blobs()
            .read(&ContentId::from_bytes(record.adapter))
            .unwrap();
    }
    for id in &reported.leases {
        let lease: Option<LeaseRecord> = store.read(|r| r.get(LEASES, &u64_key(*id))).unwrap();
        assert!(lease.is_some(), "lease {id} is lost");
    }
    for id in reported.delivered.union(&reported.accepted) {
        let delta: Option<DeltaRecord> = store.read(|r| r.get(DELTAS, &u64_key(*id))).unwrap();
        let delta = delta.unwrap_or_else(|| panic!("the delta of lease {id} is lost"));
        if reported.accepted.contains(id) {
            assert_eq!(delta.status, DeltaStatus::Accepted, "lease {id}");
        }
        c.blobs().read(&ContentId::from_bytes(delta.delta)).unwrap();
    }
    c
}

fn unhex(s: &str) -> [u8; 32] {
    let bytes: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

#[test]
fn a_coordinator_killed_at_any_point_of_a_round_restarts_and_loses_nothing() {
    let clock = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    // Each child is killed at the first such event it prints (the events of a round come in
    // this order, so the plan walks through both rounds).
    let plan = [
        // While it prepares the job (shards, the first version's evaluation).
        Kill::After("job"),
        // Round 1: every volunteer's first delta is challenged.
        Kill::After("lease"),
        Kill::After("delivered"),
        Kill::After("challenged"),
        Kill::After("accepted"),
        // In the middle of the merge (computed outside any transaction).
        Kill::After("closing"),
        // Right after version 2 was published.
        Kill::After("closed"),
        // Round 2: no challenges; a delivered delta is verified after the restart.
        Kill::After("delivered"),
        Kill::After("closing"),
        Kill::Never,
    ];
    let mut reported = Reported {
        now: 1_000,
        ..Default::default()
    };
    for kill in plan {
        run_child(dir.path(), reported.now, kill, &mut reported);
        let c = check_reported(dir.path(), &reported);
        if matches!(kill, Kill::After("closing")) {
            // Usually the merge had not committed yet; either way nothing may be lost.
            let job = c.job(&unhex(reported.jobs.first().unwrap())).unwrap();
            eprintln!(
                "killed while closing: open round {}, {} rounds merged",
                job.round, job.rounds_merged
            );
        }
        eprintln!(
            "after {kill:?} ({:.1} s): {} leases, {} delivered, {} accepted, versions {:?}",
            clock.elapsed().as_secs_f64(),
            reported.leases.len(),
            reported.delivered.len(),
            reported.accepted.len(),
            reported.versions.keys().collect::<Vec<_>>()
        );
    }
    assert!(reported.completed);

    // The job ran to completion, and every accepted delta was merged into its round.
    let c = check_reported(dir.path(), &reported);
    assert_eq!(reported.jobs.len(), 1);
    let job = c.job(&unhex(reported.jobs.first().unwrap())).unwrap();
    assert_eq!((job.state, job.rounds_merged), (JobState::Completed, 2));
    let deltas: Vec<(Vec<u8>, DeltaRecord)> = c.store().read(|r| r.scan(DELTAS, &[])).unwrap();
    let accepted: Vec<&DeltaRecord> = deltas
        .iter()
        .map(|(_, d)| d)
        .filter(|d| d.status == DeltaStatus::Accepted)
        .collect();
    assert_eq!(accepted.len(), 4, "two rounds of two volunteers");
    for id in &reported.accepted {
        assert!(accepted.iter().any(|d| d.lease_id == *id), "lease {id}");
    }
    assert_eq!(
        job.tokens_trained,
        accepted.iter().map(|d| d.tokens).sum::<u64>(),
        "the merged tokens are the accepted deltas' tokens, each counted once"
    );
    for version in 2..=job.latest_version {
        let record = c
            .store()
            .read(|r| registry::version_record(r, "shout", version))
            .unwrap()
            .unwrap();
        let manifest = v1::Signed::decode(record.signed.as_slice()).unwrap();
        let manifest = v1::ModuleManifest::decode(manifest.payload.as_slice()).unwrap();
        assert_eq!(manifest.parent_version, version - 1);
        let round: Vec<&&DeltaRecord> = accepted
            .iter()
            .filter(|d| d.round == manifest.round)
            .collect();
        let merged: u32 = manifest.contributors.iter().map(|c| c.deltas).sum();
        assert_eq!(merged as usize, round.len(), "version {version}");
        for d in round {
            assert!(
                manifest.contributors.iter().any(|c| c.peer_id == d.peer),
                "version {version} lacks lease {}",
                d.lease_id
            );
        }
    }
    eprintln!(
        "versions {:?}, {:.1} s",
        reported.versions.keys().collect::<Vec<_>>(),
        clock.elapsed().as_secs_f64()
    );
}
