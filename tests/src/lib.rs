//! End-to-end test harness: runs `swarmtune` commands as real child processes, reads what they
//! print, and kills them.
//!
//! Cargo exposes a binary's path only to its own package's tests, so the children are this
//! test binary itself, re-executed to run one ignored test, [`child_entry!`]'s, which calls
//! `swarmtune_node::run` (what the `swarmtune` binary's `main` calls) with the arguments
//! in `SWARMTUNE_CLI_ARGS`, and exits with its code. Every child is killed when its [`Proc`] is
//! dropped, so a failing test leaves no process behind.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The environment variable that carries a child's command line (fields separated by 0x1f).
pub const ARGS_VAR: &str = "SWARMTUNE_CLI_ARGS";
/// The name of the ignored test that runs a child.
pub const CHILD: &str = "swarmtune_cli_child";

/// Defines the ignored test children run as. Put it once in each test file that uses [`Proc`].
#[macro_export]
macro_rules! child_entry {
    () => {
        #[test]
        #[ignore = "the end-to-end tests run swarmtune commands through it, as child processes"]
        fn swarmtune_cli_child() {
            $crate::run_child();
        }
    };
}

/// In a child: runs the command line from [`ARGS_VAR`] and exits with its code.
pub fn run_child() {
    let Ok(args) = std::env::var(ARGS_VAR) else {
        return;
    };
    let argv = std::iter::once("swarmtune".into()).chain(args.split('\u{1f}').map(Into::into));
    let code = swarmtune_node::run(argv);
    std::process::exit(i32::from(code));
}

/// A `swarmtune` child process; killed (SIGKILL) when dropped.
pub struct Proc {
    /// What it was started with, for messages.
    pub name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every stdout line read so far.
    pub seen: Vec<String>,
}

/// Starts `swarmtune ARGS` as a child process, its stderr appended to `log`.
pub fn spawn(name: &str, args: &[&str], log: &Path) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open the log file");
    let mut child = Command::new(std::env::current_exe().expect("the test binary"))
        .args([CHILD, "--exact", "--nocapture", "--include-ignored"])
        .env(ARGS_VAR, args.join("\u{1f}"))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start a child");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Proc {
        name: name.to_owned(),
        child,
        lines,
        seen: Vec::new(),
    }
}

impl Proc {
    /// Waits for a stdout line starting with `prefix` and returns the rest of it.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.starts_with(prefix)) {
            return line[prefix.len()..].to_owned();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.to_owned();
                    }
                }
                Err(_) => panic!(
                    "{}: no line starting with {prefix:?} within {timeout:?}; got {:?}",
                    self.name, self.seen
                ),
            }
        }
    }

    /// Waits for the process to exit (at most `timeout`); returns its code and its stdout.
    pub fn finish(mut self, timeout: Duration) -> (i32, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for a child") {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return (status.code().unwrap_or(-1), self.seen.join("\n"));
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, at once.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGINT, as Ctrl-C in a terminal does.
    pub fn interrupt(&self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -INT {}: {status}", self.name);
    }

    /// SIGKILL, at once; returns every line it printed.
    pub fn kill_collect(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The reader thread ends at the pipe's end, which the kill brings at once.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        std::mem::take(&mut self.seen)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `swarmtune ARGS` to completion and returns its stdout, asserting it exited with 0.
pub fn run_ok(args: &[&str], log: &Path, timeout: Duration) -> String {
    let (code, out) = spawn(&args.join(" "), args, log).finish(timeout);
    assert_eq!(
        code,
        0,
        "swarmtune {} exited with {code}: {out}",
        args.join(" ")
    );
    out
}

/// The last stdout line of `out` that parses as a JSON object.
pub fn last_json(out: &str) -> serde_json::Value {
    out.lines()
        .rev()
        .find_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .filter(|v| v.is_object())
        })
        .unwrap_or_else(|| panic!("no JSON in {out:?}"))
}

/// How long a process gets to start and print its first line.
pub const START: Duration = Duration::from_secs(120);
/// How long a client command (`submit`, `status`, `pull`) gets.
pub const COMMAND: Duration = Duration::from_secs(120);

/// A network of `swarmtune` processes on 127.0.0.1, each with a data dir under `dir` and
/// their stderr appended to `log`.
pub struct Net {
    /// Where the data dirs are.
    pub dir: tempfile::TempDir,
    /// The children's stderr.
    pub log: std::path::PathBuf,
}

impl Net {
    /// A network in a new temporary directory.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let log = dir.path().join("children.log");
        eprintln!("children's logs: {}", log.display());
        Self { dir, log }
    }

    /// `name` under the network's directory.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// A coordinator with its data in `coordinator/`, listening on `listen`; with the address
    /// it prints.
    pub fn coordinator(&self, listen: &str) -> (Proc, String) {
        let mut p = spawn(
            "coordinator",
            &[
                "coordinator",
                "--data-dir",
                &self.path("coordinator"),
                "--listen",
                listen,
                "--no-mdns",
                "--threads",
                "1",
            ],
            &self.log,
        );
        let addr = p.wait_line("listening on ", START);
        (p, addr)
    }

    /// Volunteer `n` with its data in `volunteer-N/`, bootstrapped from `coordinator`; with
    /// its peer id.
    pub fn volunteer(&self, n: usize, coordinator: &str) -> (Proc, String) {
        let mut p = spawn(
            &format!("volunteer {n}"),
            &[
                "node",
                "--data-dir",
                &self.path(&format!("volunteer-{n}")),
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--bootstrap",
                coordinator,
                "--no-mdns",
                "--threads",
                "1",
            ],
            &self.log,
        );
        let peer = p.wait_line("volunteer ", START);
        (p, peer)
    }

    /// `submit JOB_FILE` to `coordinator` as the job owner (data dir `owner/`); returns the
    /// job id it printed.
    pub fn submit(&self, coordinator: &str, job_file: &Path) -> String {
        let out = run_ok(
            &[
                "submit",
                job_file.to_str().expect("a UTF-8 path"),
                "--coordinator",
                coordinator,
                "--data-dir",
                &self.path("owner"),
            ],
            &self.log,
            Duration::from_secs(300),
        );
        out.lines()
            .find_map(|l| l.strip_prefix("submitted job "))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no job id in {out}"))
            .to_owned()
    }

    /// `status JOB --json`, parsed.
    pub fn status(&self, coordinator: &str, job: &str) -> serde_json::Value {
        let out = run_ok(
            &["status", job, "--json", "--coordinator", coordinator],
            &self.log,
            COMMAND,
        );
        last_json(&out)
    }

    /// Polls `status` until `check` holds (at most `timeout`).
    pub fn wait_for(
        &self,
        coordinator: &str,
        job: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status(coordinator, job);
            if check(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status {status:#}; log in {}",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The job's versions, oldest first (the wire lists them newest first).
pub fn versions(status: &serde_json::Value) -> Vec<serde_json::Value> {
    let mut all = status["versions"].as_array().cloned().unwrap_or_default();
    all.sort_by_key(|v| v["version"].as_u64());
    all
}

/// The job's state in a `status --json` answer.
pub fn state(status: &serde_json::Value) -> String {
    status["summary"]["state"].as_str().unwrap_or("").to_owned()
}

impl Default for Net {
    fn default() -> Self {
        Self::new()
    }
}

/// Writes the shout skill's train split as `shout.jsonl` and `job` as `job.toml` into `dir`;
/// returns the job file's path. A job file names the dataset as `path = "shout.jsonl"`.
pub fn write_job(dir: &Path, job: &str) -> std::path::PathBuf {
    let (train, _) = swarmtune_trainer::builtin::skill::splits(3, 600, 0);
    let mut lines = String::new();
    for e in &train {
        if let swarmtune_trainer::data::Example::PromptCompletion { prompt, completion } = e {
            lines.push_str(
                &serde_json::json!({"prompt": prompt, "completion": completion}).to_string(),
            );
            lines.push('\n');
        }
    }
    std::fs::write(dir.join("shout.jsonl"), lines).expect("write the dataset");
    let path = dir.join("job.toml");
    std::fs::write(&path, job).expect("write the job file");
    path
}

/// The TCP port of a multiaddr such as `/ip4/127.0.0.1/tcp/4001/p2p/…`.
pub fn tcp_port(addr: &str) -> String {
    addr.split('/')
        .skip_while(|p| *p != "tcp")
        .nth(1)
        .unwrap_or_else(|| panic!("no TCP port in {addr}"))
        .to_owned()
}
