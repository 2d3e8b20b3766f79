//! `tessera cluster`: worker processes on this machine, one per shard, on their own loopback addresses
//! (127.0.0.2, 127.0.0.3, …), so a newcomer gets a real multi-process cluster with one command and the
//! integration tests exercise the same network paths a multi-host deployment uses.
//!
//! Workers bind port 0 and report the ports they got through `--addr-file` (no port races). Each child is
//! asked to die with its launcher (`PR_SET_PDEATHSIG`), and [`LocalCluster`] kills the rest on drop, so
//! stopping the launcher — normally, by signal, or by a panic — leaves no worker behind.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

use tessera_worker::Device;

use crate::serve::remote::WorkerAddr;

#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("starting worker for stage {stage} rank {rank} ({exe}): {source}")]
    Spawn {
        stage: usize,
        rank: usize,
        exe: String,
        source: std::io::Error,
    },
    #[error(
        "worker for stage {stage} rank {rank} exited with {status} before it was ready (its log: {log})"
    )]
    Exited {
        stage: usize,
        rank: usize,
        status: std::process::ExitStatus,
        log: String,
    },
    #[error(
        "worker for stage {stage} rank {rank} was not ready within {timeout:?} (its log: {log})"
    )]
    Timeout {
        stage: usize,
        rank: usize,
        timeout: Duration,
        log: String,
    },
    #[error(
        "--device lists {given} devices for {n} workers (tp={tp} × pp={pp}): give one device for all workers, or \
         one per worker in stage-major order"
    )]
    Devices {
        given: usize,
        n: usize,
        tp: usize,
        pp: usize,
    },
    #[error("{tp}×{pp} workers need {n} loopback addresses, more than 127.0.0.2..127.0.0.254 hold")]
    TooManyWorkers { tp: usize, pp: usize, n: usize },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What to start.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The program and leading arguments that run a worker, e.g. `[tessera, worker]`.
    pub worker_command: Vec<String>,
    pub shard_dir: PathBuf,
    pub tp: usize,
    pub pp: usize,
    /// Compute threads of each worker.
    pub threads: usize,
    /// Where each worker runs its shard: empty (all on the CPU), one device for all, or one per worker in
    /// stage-major order (stage 0 rank 0, stage 0 rank 1, …) for a mixed GPU/CPU cluster.
    pub devices: Vec<Device>,
    /// Extra worker arguments (e.g. `--max-context 8192`).
    pub extra_args: Vec<String>,
    /// Where worker logs and address files go.
    pub run_dir: PathBuf,
    /// How long a worker may take to load and verify its shard.
    pub ready_timeout: Duration,
}

/// One started worker.
#[derive(Debug)]
pub struct WorkerProcess {
    pub stage: usize,
    pub rank: usize,
    pub grpc_addr: String,
    pub peer_addr: String,
    pub log: PathBuf,
    /// The loopback IP it binds; kept so a restarted worker can take the same address.
    pub ip: Ipv4Addr,
    child: Option<Child>,
}

impl WorkerProcess {
    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// Worker processes started by [`LocalCluster::start`]; dropping it kills them.
#[derive(Debug)]
pub struct LocalCluster {
    pub spec: LaunchSpec,
    pub workers: Vec<WorkerProcess>,
}

/// Loopback IP of worker `i` (stage-major): 127.0.0.2 onwards, so 127.0.0.1 stays the coordinator's.
fn worker_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, (2 + i) as u8)
}

impl LocalCluster {
    /// Starts `tp × pp` workers and waits until each has bound its listeners.
    pub fn start(spec: LaunchSpec) -> Result<LocalCluster, LaunchError> {
        let n = spec.tp * spec.pp;
        if n > 253 {
            return Err(LaunchError::TooManyWorkers {
                tp: spec.tp,
                pp: spec.pp,
                n,
            });
        }
        if spec.devices.len() > 1 && spec.devices.len() != n {
            return Err(LaunchError::Devices {
                given: spec.devices.len(),
                n,
                tp: spec.tp,
                pp: spec.pp,
            });
        }
        std::fs::create_dir_all(&spec.run_dir).map_err(|source| LaunchError::Io {
            path: spec.run_dir.clone(),
            source,
        })?;
        let mut cluster = LocalCluster {
            spec,
            workers: Vec::with_capacity(n),
        };
        for stage in 0..cluster.spec.pp {
            for rank in 0..cluster.spec.tp {
                let ip = worker_ip(stage * cluster.spec.tp + rank);
                let w = spawn_worker(&cluster.spec, stage, rank, ip, None)?;
                cluster.workers.push(w);
            }
        }
        for i in 0..cluster.workers.len() {
            wait_ready(&cluster.spec, &mut cluster.workers[i])?;
        }
        Ok(cluster)
    }

    /// Where the coordinator finds each shard's worker.
    pub fn worker_addrs(&self) -> Vec<WorkerAddr> {
        self.workers
            .iter()
            .map(|w| WorkerAddr {
                stage: w.stage,
                rank: w.rank,
                addr: w.grpc_addr.clone(),
            })
            .collect()
    }

    /// Kills worker `i` (SIGKILL: a machine dying, not a clean shutdown) and reaps it.
    pub fn kill_worker(&mut self, i: usize) {
        if let Some(mut child) = self.workers[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts worker `i` again on the same addresses (it was killed or exited).
    pub fn restart_worker(&mut self, i: usize) -> Result<(), LaunchError> {
        self.kill_worker(i);
        let old = &self.workers[i];
        let fixed = Some((old.grpc_addr.clone(), old.peer_addr.clone()));
        let mut w = spawn_worker(&self.spec, old.stage, old.rank, old.ip, fixed)?;
        wait_ready(&self.spec, &mut w)?;
        self.workers[i] = w;
        Ok(())
    }

    /// Workers that have exited on their own, with their exit status.
    pub fn exited(&mut self) -> Vec<(usize, std::process::ExitStatus)> {
        let mut out = Vec::new();
        for (i, w) in self.workers.iter_mut().enumerate() {
            if let Some(child) = w.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                w.child = None;
                out.push((i, status));
            }
        }
        out
    }

    /// Stops every worker: SIGTERM, a grace period, then SIGKILL.
    pub fn shutdown(&mut self, grace: Duration) {
        for w in &self.workers {
            if let Some(child) = &w.child {
                // SAFETY: plain FFI call on a pid we spawned and have not reaped yet.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + grace;
        for w in &mut self.workers {
            if let Some(mut child) = w.child.take() {
                loop {
                    match child.try_wait() {
                        Ok(Some(_)) => break,
                        Ok(None) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        _ => {
                            let _ = child.kill();
                            let _ = child.wait();
                            break;
                        }
                    }
                }
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.shutdown(Duration::from_secs(2));
    }
}

impl LaunchSpec {
    /// The device of worker (`stage`, `rank`).
    pub fn device_of(&self, stage: usize, rank: usize) -> Device {
        match self.devices.as_slice() {
            [] => Device::Cpu,
            [one] => *one,
            all => all.get(stage * self.tp + rank).copied().unwrap_or_default(),
        }
    }
}

fn addr_file(spec: &LaunchSpec, stage: usize, rank: usize) -> PathBuf {
    spec.run_dir
        .join(format!("worker-s{stage:02}-r{rank:02}.addr"))
}

fn spawn_worker(
    spec: &LaunchSpec,
    stage: usize,
    rank: usize,
    ip: Ipv4Addr,
    fixed: Option<(String, String)>,
) -> Result<WorkerProcess, LaunchError> {
    let addr_path = addr_file(spec, stage, rank);
    let _ = std::fs::remove_file(&addr_path);
    let log = spec
        .run_dir
        .join(format!("worker-s{stage:02}-r{rank:02}.log"));
    let log_file = std::fs::File::create(&log).map_err(|source| LaunchError::Io {
        path: log.clone(),
        source,
    })?;
    let log_err = log_file.try_clone().map_err(|source| LaunchError::Io {
        path: log.clone(),
        source,
    })?;
    let (listen, peer_listen) = fixed.unwrap_or_else(|| (format!("{ip}:0"), format!("{ip}:0")));
    let Some((exe, lead)) = spec.worker_command.split_first() else {
        return Err(LaunchError::Spawn {
            stage,
            rank,
            exe: String::new(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty worker command"),
        });
    };
    let mut cmd = Command::new(exe);
    cmd.args(lead)
        .arg("--shard-dir")
        .arg(&spec.shard_dir)
        .args(["--stage", &stage.to_string(), "--rank", &rank.to_string()])
        .args(["--listen", &listen, "--peer-listen", &peer_listen])
        .arg("--addr-file")
        .arg(&addr_path)
        .args(["--threads", &spec.threads.to_string()])
        .args(["--device", &spec.device_of(stage, rank).to_string()])
        .args(&spec.extra_args)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    die_with_parent(&mut cmd);
    let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
        stage,
        rank,
        exe: exe.clone(),
        source,
    })?;
    tracing::info!(stage, rank, pid = child.id(), %ip, "started worker");
    Ok(WorkerProcess {
        stage,
        rank,
        grpc_addr: String::new(),
        peer_addr: String::new(),
        log,
        ip,
        child: Some(child),
    })
}

/// Asks the kernel to SIGTERM the child when the launcher dies, however it dies.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only makes an async-signal-safe syscall.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Waits for the worker's address file (written after it verified its shard and bound its listeners).
fn wait_ready(spec: &LaunchSpec, w: &mut WorkerProcess) -> Result<(), LaunchError> {
    let path = addr_file(spec, w.stage, w.rank);
    let deadline = Instant::now() + spec.ready_timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let mut it = text.split_whitespace();
            if let (Some(grpc), Some(peer)) = (it.next(), it.next()) {
                w.grpc_addr = grpc.to_owned();
                w.peer_addr = peer.to_owned();
                return Ok(());
            }
        }
        if let Some(child) = w.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            w.child = None;
            return Err(LaunchError::Exited {
                stage: w.stage,
                rank: w.rank,
                status,
                log: log_tail(&w.log),
            });
        }
        if Instant::now() >= deadline {
            return Err(LaunchError::Timeout {
                stage: w.stage,
                rank: w.rank,
                timeout: spec.ready_timeout,
                log: log_tail(&w.log),
            });
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The last lines of a worker log, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
    format!("{}: {tail}", path.display())
}

/// Why no shard set could be prepared.
#[derive(Debug, Error)]
pub enum ShardPrepError {
    #[error(transparent)]
    ShardTool(#[from] shard_tool::Error),
    #[error(
        "{dir} holds a tp={have_tp} pp={have_pp} shard set, but --tp {tp} --pp {pp} was asked for: split again or drop the flags"
    )]
    Topology {
        dir: PathBuf,
        have_tp: usize,
        have_pp: usize,
        tp: usize,
        pp: usize,
    },
}

/// The shard directory to serve: `model` itself when it is one (its topology must agree with `tp`/`pp` when
/// they are given), else `out` (or a cache directory named after the model and topology) holding a split
/// of `model` — reused when its manifest records the same source files and sizes, written otherwise.
pub fn prepare_shards(
    model: &[PathBuf],
    tp: Option<usize>,
    pp: Option<usize>,
    out: Option<PathBuf>,
    progress: bool,
) -> Result<(PathBuf, shard_tool::manifest::Manifest), ShardPrepError> {
    use shard_tool::manifest::{MANIFEST_NAME, Manifest};
    if let [dir] = model
        && dir.join(MANIFEST_NAME).is_file()
    {
        let manifest = Manifest::load(dir)?;
        let topo = manifest.plan.topology.clone();
        if tp.is_some_and(|t| t != topo.tp) || pp.is_some_and(|p| p != topo.pp) {
            return Err(ShardPrepError::Topology {
                dir: dir.clone(),
                have_tp: topo.tp,
                have_pp: topo.pp,
                tp: tp.unwrap_or(topo.tp),
                pp: pp.unwrap_or(topo.pp),
            });
        }
        return Ok((dir.clone(), manifest));
    }
    let (tp, pp) = (tp.unwrap_or(1), pp.unwrap_or(1));
    let ckpt = shard_tool::checkpoint::Checkpoint::open(model)?;
    let out = out.unwrap_or_else(|| default_shard_dir(model, tp, pp));
    if out.join(MANIFEST_NAME).is_file()
        && let Ok(m) = Manifest::load(&out)
        && m.source.bytes == ckpt.source_bytes()
        && m.source.paths == ckpt.paths
        && m.plan.topology.tp == tp
        && m.plan.topology.pp == pp
    {
        tracing::info!(dir = %out.display(), "reusing shard set");
        return Ok((out, m));
    }
    let plan = shard_tool::plan::plan(
        &ckpt.config,
        &ckpt.tensors,
        &shard_tool::plan::Topology::new(tp, pp),
    )?;
    let manifest = shard_tool::split::split(
        &ckpt,
        &plan,
        &shard_tool::split::SplitOptions {
            out_dir: out.clone(),
            force: true,
            progress,
        },
    )?;
    Ok((out, manifest))
}

/// `$TESSERA_CACHE/shards/<model stem>-tpT-ppP` (default cache `~/.cache/tessera`).
fn default_shard_dir(model: &[PathBuf], tp: usize, pp: usize) -> PathBuf {
    let cache = std::env::var_os("TESSERA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/tessera")))
        .unwrap_or_else(std::env::temp_dir);
    let stem = model
        .first()
        .and_then(|p| p.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    cache.join("shards").join(format!("{stem}-tp{tp}-pp{pp}"))
}
