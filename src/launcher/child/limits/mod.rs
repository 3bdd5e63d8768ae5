//! Per-step resource limits for the local launchers, so that one step cannot take the host
//! (and the controller with every other step) down.
//!
//! A step's limits are its run's op tags `dagster-taskiq/memory` and `dagster-taskiq/cpu`,
//! else `--step-memory-limit` / `--step-cpu-limit`. How they are enforced is decided once at
//! start ([`StepLimiter::detect`]) and logged:
//! - **cgroup v2**: each step gets a cgroup of its own under a delegated cgroup, with
//!   `memory.max`, `memory.swap.max` 0, `memory.oom.group` 1 and `cpu.max`; a step past its
//!   memory is killed by the kernel alone (its whole cgroup, nothing else), and its
//!   `memory.events` `oom_kill` count says so in the verdict;
//! - **cgroup v1** (a host whose memory controller is still on v1): the same per step in the
//!   memory and cpu hierarchies ([`cgroup_v1`]), `memory.oom_control`'s `oom_kill` count
//!   for the verdict;
//! - **address-space rlimit** (no usable cgroup): `RLIMIT_AS` at the memory limit, so an
//!   allocation past it fails (`MemoryError` in Python) instead of growing; a CPU limit is not
//!   enforced in this mode (`RLIMIT_CPU` caps total CPU seconds, not a share).
//!
//! A cold step enters its cgroup (or gets its rlimit) between fork and exec; a warm step is
//! placed by the controller after the zygote forked it and before its go byte, so no step code
//! runs unlimited (docs/operations.md, "Step resource limits").

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::process::Command;

use crate::launcher::{LaunchError, StepExit};

mod cgroup_v1;

/// Op tag: the step's memory limit (`512Mi`, `2Gi`, or a number of MiB).
pub(crate) const MEMORY_TAG: &str = "dagster-taskiq/memory";
/// Op tag: the step's CPU limit in cores (`0.5`, `2`, or millicores `500m`).
pub(crate) const CPU_TAG: &str = "dagster-taskiq/cpu";

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// Below this no Python step even starts: a limit this small is a typo.
const MIN_MEMORY: u64 = 16 * MIB;
/// How long dropping a step's cgroup waits for the processes `cgroup.kill` ended.
const STRAY_EXIT_POLLS: u32 = 20;
const STRAY_EXIT_POLL: std::time::Duration = std::time::Duration::from_millis(5);
/// `cpu.max`'s period, in microseconds (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// The step resource flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Memory limit of each process or warm step unless its op tag dagster-taskiq/memory sets
    /// one: `512Mi`, `2Gi`, or a number of MiB. Default: none.
    #[arg(
        long,
        env = "DAGSTER_TASKIQ_STEP_MEMORY_LIMIT",
        value_name = "SIZE",
        value_parser = parse_memory
    )]
    pub step_memory_limit: Option<u64>,

    /// CPU limit of each process or warm step unless its op tag dagster-taskiq/cpu sets one, in
    /// cores: `0.5`, `2`, or millicores `500m`. Enforced in cgroup mode only. Default: none.
    #[arg(
        long,
        env = "DAGSTER_TASKIQ_STEP_CPU_LIMIT",
        value_name = "CORES",
        value_parser = parse_cpu
    )]
    pub step_cpu_limit: Option<u32>,

    /// The cgroup directory steps get their own cgroups under: `auto` (the controller's own
    /// cgroup when it is its container's, v2 or else v1; else the rlimit fallback), `off`
    /// (always the rlimit fallback), or a directory: a cgroup v2 one, or one of the cgroup v1
    /// memory hierarchy (the cpu hierarchy's directory at the same place, if any, takes CPU
    /// limits). A directory must work, or the controller does not start.
    #[arg(
        long,
        env = "DAGSTER_TASKIQ_STEP_CGROUP",
        value_name = "auto|off|DIR",
        default_value = "auto",
        value_parser = parse_cgroup_choice
    )]
    pub step_cgroup: CgroupChoice,
}

/// Where step cgroups go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupChoice {
    Auto,
    Off,
    Dir(PathBuf),
}

fn parse_cgroup_choice(text: &str) -> Result<CgroupChoice, String> {
    match text.trim() {
        "auto" => Ok(CgroupChoice::Auto),
        "off" => Ok(CgroupChoice::Off),
        "" => Err("expected auto, off or a cgroup directory".into()),
        dir if Path::new(dir).is_absolute() => Ok(CgroupChoice::Dir(dir.into())),
        dir => Err(format!("{dir:?} is not an absolute path (or auto, off)")),
    }
}

/// Parses a memory size: `512Mi`, `512MiB`, `2Gi`, `2GiB`, or a bare number of MiB.
pub(crate) fn parse_memory(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (number, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => t.split_at(at),
        None => (t, ""),
    };
    let unit_bytes = match unit {
        "" | "Mi" | "MiB" => MIB,
        "Gi" | "GiB" => GIB,
        _ => {
            return Err(format!(
                "{text:?} is not a memory size (512Mi, 2Gi, or a number of MiB)"
            ))
        }
    };
    let bytes = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_bytes))
        .ok_or_else(|| format!("{text:?} is not a memory size (512Mi, 2Gi, or a number of MiB)"))?;
    if bytes < MIN_MEMORY {
        return Err(format!("{text:?} is below the 16 MiB minimum"));
    }
    Ok(bytes)
}

/// Parses a CPU limit in cores (`0.5`, `2`) or millicores (`500m`) into millicores.
pub(crate) fn parse_cpu(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let bad = || format!("{text:?} is not a CPU limit (cores: 0.5, 2; or millicores: 500m)");
    let millis = match t.strip_suffix('m') {
        Some(m) => m.parse::<u32>().map_err(|_| bad())?,
        None => {
            let cores: f64 = t.parse().map_err(|_| bad())?;
            if !cores.is_finite() || cores <= 0.0 || cores > 1024.0 {
                return Err(bad());
            }
            (cores * 1000.0).round() as u32
        }
    };
    if !(10..=1_024_000).contains(&millis) {
        return Err(format!("{text:?} must be between 10m and 1024 cores"));
    }
    Ok(millis)
}

/// `512 MiB`, `2 GiB`: a size as the verdict names it.
pub(crate) fn human_bytes(bytes: u64) -> String {
    if bytes % GIB == 0 {
        format!("{} GiB", bytes / GIB)
    } else if bytes % MIB == 0 {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// One step's limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Limits {
    pub memory: Option<u64>,
    /// Millicores.
    pub cpu: Option<u32>,
}

impl Limits {
    /// The op tags' limits over the defaults; a tag that does not parse is an error naming it.
    pub(crate) fn of_tags(
        tags: &BTreeMap<String, String>,
        defaults: Limits,
    ) -> Result<Limits, String> {
        let tag = |name: &str| tags.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
        let memory = match tag(MEMORY_TAG) {
            Some(v) => Some(parse_memory(v).map_err(|e| format!("op tag {MEMORY_TAG}: {e}"))?),
            None => defaults.memory,
        };
        let cpu = match tag(CPU_TAG) {
            Some(v) => Some(parse_cpu(v).map_err(|e| format!("op tag {CPU_TAG}: {e}"))?),
            None => defaults.cpu,
        };
        Ok(Limits { memory, cpu })
    }

    fn is_empty(&self) -> bool {
        self.memory.is_none() && self.cpu.is_none()
    }
}

/// Why cgroup mode is not available.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 membership in /proc/self/cgroup")]
    NotMember,
    #[error("no cgroup2 file system mounted")]
    NotMounted,
    #[error("{0} is the root of its hierarchy (not a delegated cgroup)")]
    Root(PathBuf),
    #[error(
        "the controller's cgroup {0} is not the root of a cgroup namespace (a container's own): \
         name a delegated cgroup with --step-cgroup DIR"
    )]
    NotNamespaced(String),
    #[error("{dir} has no memory controller (cgroup.controllers: {controllers:?})")]
    NoMemoryController { dir: PathBuf, controllers: String },
    #[error(
        "{0} is neither a cgroup v2 directory (cgroup.controllers) nor one of the cgroup v1 \
         memory hierarchy (memory.limit_in_bytes)"
    )]
    NotACgroup(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

pub(super) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_owned();
    move |source| CgroupError::Io { what, path, source }
}

/// How limits are enforced on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Step cgroups under `root` (whose `cgroup.subtree_control` has memory, and cpu when
    /// `cpu` is true).
    Cgroup { root: PathBuf, cpu: bool },
    /// cgroup v1: step cgroups under the memory hierarchy's directory, and the cpu
    /// hierarchy's when CPU limits are enforced.
    CgroupV1(cgroup_v1::Roots),
    /// `RLIMIT_AS` at the memory limit; CPU not enforced.
    Rlimit,
}

/// Decides and applies each step's limits.
#[derive(Debug)]
pub struct StepLimiter {
    defaults: Limits,
    mode: Mode,
    next: AtomicU64,
}

impl StepLimiter {
    /// No default limits, rlimit mode, no detection: what tests without limits use.
    pub fn unlimited() -> Self {
        Self::with_mode(Limits::default(), Mode::Rlimit)
    }

    pub(crate) fn with_mode(defaults: Limits, mode: Mode) -> Self {
        Self {
            defaults,
            mode,
            next: AtomicU64::new(0),
        }
    }

    /// Decides the mode from the flags and what this host allows, and logs it. An explicit
    /// `--step-cgroup DIR` that does not work is an error; `auto` falls back to the rlimit.
    pub fn detect(args: &LimitArgs) -> Result<Self, CgroupError> {
        let defaults = Limits {
            memory: args.step_memory_limit,
            cpu: args.step_cpu_limit,
        };
        let mode = match &args.step_cgroup {
            CgroupChoice::Off => {
                tracing::info!(
                    "step resource limits: address-space rlimit (RLIMIT_AS), --step-cgroup off; CPU limits are not enforced"
                );
                Mode::Rlimit
            }
            // A cgroup v2 directory has cgroup.controllers; anything else must be v1 memory.
            CgroupChoice::Dir(dir) if dir.join("cgroup.controllers").exists() => {
                let cpu = prepare_root(dir)?;
                Mode::Cgroup {
                    root: dir.clone(),
                    cpu,
                }
            }
            CgroupChoice::Dir(dir) => Mode::CgroupV1(cgroup_v1::prepare(dir)?),
            CgroupChoice::Auto => match delegate_own_cgroup() {
                Ok((root, cpu)) => Mode::Cgroup { root, cpu },
                Err(v2) => match cgroup_v1::own() {
                    Ok(roots) => Mode::CgroupV1(roots),
                    Err(v1) => {
                        tracing::info!(
                            v2 = %v2,
                            v1 = %v1,
                            "step resource limits: address-space rlimit (RLIMIT_AS), no delegated cgroup; CPU limits are not enforced"
                        );
                        Mode::Rlimit
                    }
                },
            },
        };
        log_cgroup_mode(&mode);
        if let Some(memory) = defaults.memory {
            tracing::info!(
                limit = %human_bytes(memory),
                "default step memory limit (--step-memory-limit)"
            );
        }
        let cpu_enforced = match &mode {
            Mode::Cgroup { cpu, .. } => *cpu,
            Mode::CgroupV1(roots) => roots.cpu.is_some(),
            Mode::Rlimit => false,
        };
        if let (Some(cpu), false) = (defaults.cpu, cpu_enforced) {
            tracing::warn!(
                millicores = cpu,
                "--step-cpu-limit is not enforced: no cgroup with the cpu controller"
            );
        }
        Ok(Self::with_mode(defaults, mode))
    }

    /// This step's placement: its cgroup (created now) or its rlimit; `None` when it has no
    /// limits. A bad `dagster-taskiq/memory` or `dagster-taskiq/cpu` tag is invalid launch
    /// settings (the message is dead-lettered).
    pub(crate) fn prepare(
        &self,
        tags: &BTreeMap<String, String>,
        task_id: &str,
    ) -> Result<Option<Placement>, LaunchError> {
        let limits =
            Limits::of_tags(tags, self.defaults).map_err(|detail| LaunchError::Invalid {
                reason: "invalid_launch_tags",
                detail,
            })?;
        if limits.is_empty() {
            return Ok(None);
        }
        let name = || {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            format!("step-{}-{n}-{task_id}", std::process::id())
        };
        let failed = |e: CgroupError| LaunchError::Transient(format!("step cgroup: {e}"));
        let cgroup = match &self.mode {
            Mode::Rlimit => None,
            Mode::Cgroup { root, cpu } => {
                let dir = root.join(name());
                create_step_cgroup(&dir, limits, *cpu).map_err(failed)?;
                Some(StepCgroup::V2(dir))
            }
            Mode::CgroupV1(roots) => {
                let dirs = cgroup_v1::create(roots, &name(), limits).map_err(failed)?;
                Some(StepCgroup::V1(dirs))
            }
        };
        Ok(Some(Placement { limits, cgroup }))
    }
}

fn log_cgroup_mode(mode: &Mode) {
    match mode {
        Mode::Cgroup { root, cpu } => tracing::info!(
            root = %root.display(),
            cpu,
            "step resource limits: a cgroup v2 per step (memory.max, memory.swap.max 0, cpu.max)"
        ),
        Mode::CgroupV1(roots) => tracing::info!(
            memory = %roots.memory.display(),
            cpu = ?roots.cpu,
            "step resource limits: a cgroup v1 per step (memory.limit_in_bytes, no swap, cpu.cfs_quota_us)"
        ),
        Mode::Rlimit => {}
    }
}

/// Checks `dir` is a cgroup v2 directory with the memory controller and enables memory (and
/// cpu, when offered) for its children. Returns whether cpu is enabled.
fn prepare_root(dir: &Path) -> Result<bool, CgroupError> {
    let controllers_path = dir.join("cgroup.controllers");
    let controllers =
        fs::read_to_string(&controllers_path).map_err(io("cannot read", &controllers_path))?;
    let offered: Vec<&str> = controllers.split_whitespace().collect();
    if !offered.contains(&"memory") {
        return Err(CgroupError::NoMemoryController {
            dir: dir.to_owned(),
            controllers: controllers.trim().to_owned(),
        });
    }
    let cpu = offered.contains(&"cpu");
    let subtree = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&subtree).map_err(io("cannot read", &subtree))?;
    let enabled: Vec<&str> = enabled.split_whitespace().collect();
    let mut want = Vec::new();
    if !enabled.contains(&"memory") {
        want.push("+memory");
    }
    if cpu && !enabled.contains(&"cpu") {
        want.push("+cpu");
    }
    if !want.is_empty() {
        // EBUSY here: the directory has processes of its own (cgroup v2 lets only leaves
        // hold processes).
        fs::write(&subtree, want.join(" "))
            .map_err(io("cannot enable controllers in", &subtree))?;
    }
    // A probe proves children get the interface files.
    let probe = dir.join(format!("dagster-taskiq-probe-{}", std::process::id()));
    create_step_cgroup(
        &probe,
        Limits {
            memory: Some(GIB),
            cpu: cpu.then_some(1000),
        },
        cpu,
    )?;
    let _ = fs::remove_dir(&probe);
    Ok(cpu)
}

/// `auto`: the controller's own cgroup when it is a container's (the root of a private cgroup
/// namespace, writable: the container was given its cgroup). Its processes move into a
/// `controller` leaf beneath it, as cgroup v2 allows processes only in leaves once children
/// have controllers; steps get cgroups beside that leaf. Anywhere else (a systemd service, a
/// host) the controller does not rearrange cgroups it was not given: `--step-cgroup DIR`
/// names a delegated one.
fn delegate_own_cgroup() -> Result<(PathBuf, bool), CgroupError> {
    let membership = fs::read_to_string("/proc/self/cgroup")
        .map_err(io("cannot read", Path::new("/proc/self/cgroup")))?;
    let own = membership
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(CgroupError::NotMember)?
        .trim()
        .to_owned();
    let mount = cgroup2_mount()?;
    if own != "/" {
        return Err(CgroupError::NotNamespaced(own));
    }
    let dir = mount;
    // The hierarchy's root has no memory.max: not ours to divide.
    if !dir.join("memory.max").exists() {
        let controllers = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        if !controllers.split_whitespace().any(|c| c == "memory") {
            return Err(CgroupError::NoMemoryController {
                dir,
                controllers: controllers.trim().to_owned(),
            });
        }
        return Err(CgroupError::Root(dir));
    }
    let controllers_path = dir.join("cgroup.controllers");
    let controllers =
        fs::read_to_string(&controllers_path).map_err(io("cannot read", &controllers_path))?;
    if !controllers.split_whitespace().any(|c| c == "memory") {
        return Err(CgroupError::NoMemoryController {
            dir,
            controllers: controllers.trim().to_owned(),
        });
    }
    let leaf = dir.join("controller");
    match fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("cannot create", &leaf)(e)),
    }
    let procs = dir.join("cgroup.procs");
    let leaf_procs = leaf.join("cgroup.procs");
    for pid in fs::read_to_string(&procs)
        .map_err(io("cannot read", &procs))?
        .split_whitespace()
    {
        // A process that exited meanwhile (ESRCH) is fine.
        if let Err(e) = fs::write(&leaf_procs, pid) {
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(io("cannot move a process into", &leaf_procs)(e));
            }
        }
    }
    let cpu = prepare_root(&dir)?;
    Ok((dir, cpu))
}

/// The mount point of the cgroup2 file system whose root is the hierarchy's (as
/// /proc/self/mountinfo says).
fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io("cannot read", Path::new("/proc/self/mountinfo")))?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let fields: Vec<&str> = left.split_whitespace().collect();
            if fields.get(3) != Some(&"/") {
                return None;
            }
            fields.get(4).map(PathBuf::from)
        })
        .ok_or(CgroupError::NotMounted)
}

fn create_step_cgroup(dir: &Path, limits: Limits, cpu: bool) -> Result<(), CgroupError> {
    fs::create_dir(dir).map_err(io("cannot create", dir))?;
    let write = |file: &str, value: String| {
        let path = dir.join(file);
        fs::write(&path, value).map_err(io("cannot write", &path))
    };
    let result = (|| {
        if let Some(memory) = limits.memory {
            write("memory.max", memory.to_string())?;
            // Swap would let the step outgrow its limit on disk; the file is there only with
            // swap accounting.
            if dir.join("memory.swap.max").exists() {
                write("memory.swap.max", "0".into())?;
            }
            // The whole step goes when one of its processes is OOM-killed: no half-step.
            if dir.join("memory.oom.group").exists() {
                write("memory.oom.group", "1".into())?;
            }
        }
        if let (Some(millis), true) = (limits.cpu, cpu) {
            let quota = u64::from(millis) * CPU_PERIOD_US / 1000;
            write("cpu.max", format!("{quota} {CPU_PERIOD_US}"))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_dir(dir);
    }
    result
}

/// A step's own cgroup (v2) or cgroups (v1: memory, then cpu), removed with its placement.
#[derive(Debug)]
pub(crate) enum StepCgroup {
    V2(PathBuf),
    V1(Vec<PathBuf>),
}

impl StepCgroup {
    fn dirs(&self) -> &[PathBuf] {
        match self {
            StepCgroup::V2(dir) => std::slice::from_ref(dir),
            StepCgroup::V1(dirs) => dirs,
        }
    }

    /// The file of the step's memory cgroup that holds its limit, as the verdict names it.
    fn limit_file(&self) -> &'static str {
        match self {
            StepCgroup::V2(_) => "memory.max",
            StepCgroup::V1(_) => "memory.limit_in_bytes",
        }
    }

    /// The kernel's OOM kills in the step's memory cgroup so far: the `oom_kill` line of
    /// `memory.events` (v2) or `memory.oom_control` (v1, Linux 4.13+).
    fn oom_kills(&self) -> Option<u64> {
        let file = match self {
            StepCgroup::V2(dir) => dir.join("memory.events"),
            StepCgroup::V1(dirs) => dirs.first()?.join("memory.oom_control"),
        };
        fs::read_to_string(file)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
    }

    /// Ends what the step left running in its cgroup (v2: `cgroup.kill`; v1: each process).
    fn kill_leftovers(&self) {
        match self {
            StepCgroup::V2(dir) => {
                let _ = fs::write(dir.join("cgroup.kill"), "1");
            }
            StepCgroup::V1(dirs) => {
                for dir in dirs {
                    cgroup_v1::kill_all(dir);
                }
            }
        }
    }
}

/// One step's limits as applied: its cgroup (removed when this is dropped) or its rlimit.
#[derive(Debug)]
pub(crate) struct Placement {
    limits: Limits,
    cgroup: Option<StepCgroup>,
}

impl Placement {
    /// Makes a cold step's child enter its cgroup, or set its rlimit, before exec.
    pub(crate) fn before_exec(&self, command: &mut Command) -> std::io::Result<()> {
        match &self.cgroup {
            Some(cgroup) => {
                // Opened here: the child only writes (async-signal-safe); "0" is the writer.
                let procs = cgroup
                    .dirs()
                    .iter()
                    .map(|dir| File::options().write(true).open(dir.join("cgroup.procs")))
                    .collect::<std::io::Result<Vec<File>>>()?;
                // SAFETY: write(2) on open descriptors is async-signal-safe.
                unsafe {
                    command.pre_exec(move || {
                        for mut file in &procs {
                            file.write_all(b"0")?;
                        }
                        Ok(())
                    });
                }
            }
            None => {
                if let Some(memory) = self.limits.memory {
                    // SAFETY: setrlimit is async-signal-safe.
                    unsafe {
                        command.pre_exec(move || set_address_space_limit(0, memory));
                    }
                }
            }
        }
        Ok(())
    }

    /// Places a forked warm step (not yet running its step: it waits for its go byte).
    pub(crate) fn adopt(&self, pid: u32) -> std::io::Result<()> {
        match &self.cgroup {
            Some(cgroup) => cgroup
                .dirs()
                .iter()
                .try_for_each(|dir| fs::write(dir.join("cgroup.procs"), pid.to_string())),
            None => match self.limits.memory {
                Some(memory) => set_address_space_limit(pid as libc::pid_t, memory),
                None => Ok(()),
            },
        }
    }

    /// The sentence for a step that ended for its memory limit: the kernel OOM-killed in its
    /// cgroup, or (rlimit mode) an allocation failed (`allocation_failed`: Dagster recorded a
    /// `MemoryError`, or a stderr line named a failed allocation, see
    /// [`names_an_allocation_failure`]). Call after it exited.
    pub(crate) fn out_of_memory(&self, exit: StepExit, allocation_failed: bool) -> Option<String> {
        let limit = human_bytes(self.limits.memory?);
        match &self.cgroup {
            Some(cgroup) => {
                let file = cgroup.limit_file();
                (cgroup.oom_kills().unwrap_or(0) > 0).then(|| {
                    format!(
                        "out of memory: {limit} limit (the step's cgroup reached {file} and \
                         the kernel killed it; {})",
                        exit.short()
                    )
                })
            }
            None => allocation_failed.then(|| {
                format!(
                    "out of memory: {limit} limit (address-space rlimit: an allocation \
                     failed; {})",
                    exit.short()
                )
            }),
        }
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        let Some(cgroup) = &self.cgroup else {
            return;
        };
        for dir in cgroup.dirs() {
            if fs::remove_dir(dir).is_ok() {
                continue;
            }
            // Something the step started outlived it: it goes with the step (cgroup.kill
            // needs Linux 5.14+); the directory can go once the kernel has finished those
            // exits, a few milliseconds.
            let mut last = None;
            for _ in 0..STRAY_EXIT_POLLS {
                cgroup.kill_leftovers();
                std::thread::sleep(STRAY_EXIT_POLL);
                match fs::remove_dir(dir) {
                    Ok(()) => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            if let Some(e) = last {
                tracing::warn!(cgroup = %dir.display(), %e, "cannot remove the step's cgroup");
            }
        }
    }
}

/// `RLIMIT_AS` of `pid` (0: this process) at `bytes`, soft and hard.
fn set_address_space_limit(pid: libc::pid_t, bytes: u64) -> std::io::Result<()> {
    let limit = libc::rlimit64 {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    // SAFETY: prlimit64 reads the struct and writes nothing (null old limit).
    let rc = unsafe { libc::prlimit64(pid, libc::RLIMIT_AS, &limit, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a step's stderr line names a failed allocation: Python names the error on a line of
/// its own in a traceback (Dagster's failure report prints the op's chain the same way); C and
/// C++ code, the others. Every line is checked as it is read, not only the tail a verdict quotes
/// (Dagster logs more after the failure).
pub(crate) fn names_an_allocation_failure(line: &str) -> bool {
    let line = line.trim();
    line == "MemoryError"
        || line.starts_with("MemoryError:")
        || line.contains("Cannot allocate memory")
        || line.contains("std::bad_alloc")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_cores_parse_and_bad_ones_are_named() {
        assert_eq!(parse_memory("256Mi"), Ok(256 * MIB));
        assert_eq!(parse_memory("256MiB"), Ok(256 * MIB));
        assert_eq!(parse_memory(" 512 "), Ok(512 * MIB));
        assert_eq!(parse_memory("2Gi"), Ok(2 * GIB));
        assert!(parse_memory("2G")
            .unwrap_err()
            .contains("not a memory size"));
        assert!(parse_memory("-1").is_err());
        assert!(parse_memory("8Mi").unwrap_err().contains("16 MiB minimum"));
        assert!(parse_memory("99999999999999Gi").is_err());
        assert_eq!(parse_cpu("0.5"), Ok(500));
        assert_eq!(parse_cpu("2"), Ok(2000));
        assert_eq!(parse_cpu("250m"), Ok(250));
        assert!(parse_cpu("0").is_err());
        assert!(parse_cpu("1m").is_err());
        assert!(parse_cpu("two").is_err());
        assert_eq!(human_bytes(512 * MIB), "512 MiB");
        assert_eq!(human_bytes(2 * GIB), "2 GiB");
        assert_eq!(parse_cgroup_choice("auto"), Ok(CgroupChoice::Auto));
        assert!(parse_cgroup_choice("relative/dir").is_err());
    }

    #[test]
    fn op_tags_override_the_defaults_and_a_bad_tag_is_invalid_launch_settings() {
        let defaults = Limits {
            memory: Some(GIB),
            cpu: Some(1000),
        };
        let tags: BTreeMap<String, String> = [(MEMORY_TAG.to_owned(), "256Mi".to_owned())].into();
        assert_eq!(
            Limits::of_tags(&tags, defaults),
            Ok(Limits {
                memory: Some(256 * MIB),
                cpu: Some(1000)
            })
        );
        let limiter = StepLimiter::with_mode(Limits::default(), Mode::Rlimit);
        assert!(limiter.prepare(&BTreeMap::new(), "t").unwrap().is_none());
        let bad: BTreeMap<String, String> = [(CPU_TAG.to_owned(), "lots".to_owned())].into();
        match limiter.prepare(&bad, "t") {
            Err(LaunchError::Invalid { reason, detail }) => {
                assert_eq!(reason, "invalid_launch_tags");
                assert!(detail.contains(CPU_TAG), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_rlimit_sentence_needs_a_failed_allocation_in_the_stderr_tail() {
        let placement = Placement {
            limits: Limits {
                memory: Some(256 * MIB),
                cpu: None,
            },
            cgroup: None,
        };
        let verdict = placement.out_of_memory(StepExit::Code(1), true).unwrap();
        assert!(
            verdict.starts_with("out of memory: 256 MiB limit"),
            "{verdict}"
        );
        assert!(placement.out_of_memory(StepExit::Code(1), false).is_none());
        assert!(names_an_allocation_failure("MemoryError"));
        assert!(names_an_allocation_failure("MemoryError: cannot grow"));
        assert!(!names_an_allocation_failure(
            "raise ValueError('MemoryError later')"
        ));
        let bare = Placement {
            limits: Limits::default(),
            cgroup: None,
        };
        assert!(bare.out_of_memory(StepExit::Code(1), true).is_none());
    }

    /// A cgroup2 file system mounted for one test (root only: fails loudly otherwise), with a
    /// child cgroup of the test's as the step cgroup root.
    struct Cgroup2 {
        mount: tempfile::TempDir,
        root: PathBuf,
    }

    impl Cgroup2 {
        fn mount() -> Self {
            let mount = tempfile::tempdir().unwrap();
            let status = std::process::Command::new("mount")
                .args(["-t", "cgroup2", "none"])
                .arg(mount.path())
                .status()
                .expect("mount(8)");
            assert!(
                status.success(),
                "cannot mount cgroup2 at {} (this test needs root): {status}",
                mount.path().display()
            );
            let root = mount
                .path()
                .join(format!("dagster-taskiq-unit-{}", std::process::id()));
            fs::create_dir(&root).unwrap();
            Cgroup2 { mount, root }
        }
    }

    impl Drop for Cgroup2 {
        fn drop(&mut self) {
            let _ = fs::remove_dir(&self.root);
            let _ = std::process::Command::new("umount")
                .arg(self.mount.path())
                .status();
        }
    }

    /// The placement's mechanics on a real cgroup v2 hierarchy (the memory and cpu files need
    /// their controllers, which a host with cgroup v1 memory lacks: they are not written
    /// here): a cold child enters its cgroup before exec, a forked one is moved in, and
    /// dropping the placement kills what is left and removes the cgroup.
    #[tokio::test]
    async fn steps_enter_their_own_cgroup_and_it_goes_with_them() {
        let cgroup = Cgroup2::mount();
        let limiter = StepLimiter::with_mode(
            Limits {
                memory: None,
                cpu: Some(500),
            },
            Mode::Cgroup {
                root: cgroup.root.clone(),
                cpu: false,
            },
        );
        let placement = limiter
            .prepare(&BTreeMap::new(), "task-1")
            .unwrap()
            .unwrap();
        let dir = placement.cgroup.as_ref().unwrap().dirs()[0].clone();
        assert!(dir.is_dir());
        let inside = format!(
            "0::/{}",
            dir.strip_prefix(cgroup.mount.path()).unwrap().display()
        );

        let mut cold = Command::new("cat");
        cold.arg("/proc/self/cgroup");
        placement.before_exec(&mut cold).unwrap();
        let out = cold.output().await.unwrap();
        let membership = String::from_utf8_lossy(&out.stdout);
        assert!(
            membership.lines().any(|l| l == inside),
            "{membership} lacks {inside}"
        );

        let mut forked = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        placement.adopt(forked.id()).unwrap();
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert_eq!(procs.trim(), forked.id().to_string());
        assert!(placement
            .out_of_memory(StepExit::Signal(9), false)
            .is_none());

        // The step "ended" with a process of its cgroup still running.
        drop(placement);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(forked.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert!(!dir.exists(), "{} is still there", dir.display());
    }

    /// The step cgroup root a memory test can use on this host: where memory is still on v1,
    /// a child of this process's own memory cgroup and the cpu hierarchy's directory at the
    /// same place (created for the test, as an operator delegates both; `created` lists the
    /// two, removed after the test); else a cgroup2 mount's. Fails loudly when neither can be
    /// made (root is needed).
    enum MemoryHost {
        V1 {
            root: PathBuf,
            created: Vec<PathBuf>,
        },
        V2(Cgroup2),
    }

    impl MemoryHost {
        fn new() -> Self {
            let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
            let membership = fs::read_to_string("/proc/self/cgroup").unwrap();
            let Some(own) = cgroup_v1::own_dir(&mountinfo, &membership, "memory") else {
                return MemoryHost::V2(Cgroup2::mount());
            };
            let root = own.join(format!("dagster-taskiq-unit-{}", std::process::id()));
            let mut created = Vec::new();
            fs::create_dir(&root)
                .unwrap_or_else(|e| panic!("cannot create {} (needs root): {e}", root.display()));
            created.push(root.clone());
            if let Some(cpu) = cgroup_v1::cpu_counterpart(&mountinfo, &root) {
                // Its parents mirror this process's memory cgroup in the cpu hierarchy, shared
                // with any other test placing cgroups here at the same time: created when
                // missing, never removed (empty cgroups).
                fs::create_dir_all(cpu.parent().unwrap()).unwrap();
                fs::create_dir(&cpu).unwrap();
                created.push(cpu);
            }
            MemoryHost::V1 { root, created }
        }

        fn mode(&self) -> Mode {
            match self {
                MemoryHost::V1 { root, .. } => Mode::CgroupV1(cgroup_v1::prepare(root).unwrap()),
                MemoryHost::V2(cgroup) => Mode::Cgroup {
                    cpu: prepare_root(&cgroup.root).unwrap(),
                    root: cgroup.root.clone(),
                },
            }
        }
    }

    impl Drop for MemoryHost {
        fn drop(&mut self) {
            if let MemoryHost::V1 { created, .. } = self {
                for dir in created.iter().rev() {
                    let _ = fs::remove_dir(dir);
                }
            }
        }
    }

    /// The kernel enforces the limit: a cold child that touches 4× its memory limit is
    /// OOM-killed in its cgroup, the sentence names the limit, and this test's process (in the
    /// parent cgroup) is untouched; a forked process is moved in, its CPU quota is written,
    /// and dropping the placement kills what is left and removes the cgroups.
    #[tokio::test]
    async fn a_child_past_its_memory_limit_is_killed_by_the_kernel_alone() {
        let host = MemoryHost::new();
        let limiter = StepLimiter::with_mode(
            Limits {
                memory: Some(64 * MIB),
                cpu: Some(250),
            },
            host.mode(),
        );
        let placement = limiter
            .prepare(&BTreeMap::new(), "task-oom")
            .unwrap()
            .unwrap();
        let cgroup = placement.cgroup.as_ref().unwrap();
        let dirs = cgroup.dirs().to_vec();

        let mut hog = Command::new("python3");
        hog.args([
            "-c",
            "b = bytearray(256 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived')",
        ]);
        placement.before_exec(&mut hog).unwrap();
        let out = hog.output().await.unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{out:?}");
        let sentence = placement
            .out_of_memory(StepExit::Signal(9), false)
            .expect("an OOM kill in the step's cgroup");
        assert!(
            sentence.starts_with("out of memory: 64 MiB limit (the step's cgroup reached memory."),
            "{sentence}"
        );

        let mut forked = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        placement.adopt(forked.id()).unwrap();
        for dir in &dirs {
            let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap();
            assert_eq!(procs.trim(), forked.id().to_string(), "{}", dir.display());
        }
        // A quarter core: 25 ms of every 100 ms.
        let quota = match cgroup {
            StepCgroup::V2(dir) => fs::read_to_string(dir.join("cpu.max")),
            StepCgroup::V1(dirs) => {
                assert_eq!(dirs.len(), 2, "no cpu cgroup: {dirs:?}");
                fs::read_to_string(dirs[1].join("cpu.cfs_quota_us"))
            }
        };
        assert!(quota.unwrap().starts_with("25000"));
        drop(placement);
        assert_eq!(forked.wait().unwrap().signal(), Some(libc::SIGKILL));
        for dir in &dirs {
            assert!(!dir.exists(), "{} is still there", dir.display());
        }
    }

    /// A real rlimit on a real child.
    #[tokio::test]
    async fn a_cold_child_gets_its_address_space_limit() {
        let limiter = StepLimiter::with_mode(Limits::default(), Mode::Rlimit);
        let tags: BTreeMap<String, String> = [(MEMORY_TAG.to_owned(), "64Mi".to_owned())].into();
        let placement = limiter.prepare(&tags, "t").unwrap().unwrap();
        let mut command = Command::new("sh");
        command.args(["-c", "ulimit -v"]);
        placement.before_exec(&mut command).unwrap();
        let out = command.output().await.unwrap();
        assert!(out.status.success(), "{out:?}");
        // KiB, as the shell reports it.
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "65536");
    }
}
