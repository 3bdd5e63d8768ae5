//! Step cgroups on a host whose memory controller is still on cgroup v1 (Amazon Linux 2, older
//! Kubernetes nodes): each controller is its own hierarchy, so a step gets a cgroup in the
//! memory hierarchy (`memory.limit_in_bytes`, `memory.memsw.limit_in_bytes` where swap is
//! accounted) and, for a CPU limit, one at the same place in the cpu hierarchy
//! (`cpu.cfs_quota_us` over `cpu.cfs_period_us`). v1 has no `cgroup.kill` and no
//! `memory.oom.group`: the kernel's OOM killer picks within the step's memory cgroup only (a
//! Python step is one process), and leftovers are killed one by one when the step ends.

use std::fs;
use std::path::{Path, PathBuf};

use super::{io, CgroupError, Limits, CPU_PERIOD_US, GIB};

/// The memory hierarchy's directory steps go under, and the cpu hierarchy's matching one when
/// CPU limits can be enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Roots {
    pub memory: PathBuf,
    pub cpu: Option<PathBuf>,
}

/// A v1 hierarchy as mounted here: its mount point and the hierarchy path it shows.
struct Mount {
    point: PathBuf,
    root: String,
}

/// The mount of the v1 hierarchy that has `controller` (`memory`, `cpu`), from
/// /proc/self/mountinfo (`... root point ... - cgroup cgroup rw,cpu,cpuacct`).
fn mount_of(mountinfo: &str, controller: &str) -> Option<Mount> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split_whitespace();
        if right.next()? != "cgroup" {
            return None;
        }
        let options = right.nth(1)?;
        if !options.split(',').any(|o| o == controller) {
            return None;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        Some(Mount {
            point: PathBuf::from(fields.get(4)?),
            root: (*fields.get(3)?).to_owned(),
        })
    })
}

/// This process's cgroup path in the v1 hierarchy of `controller`, from /proc/self/cgroup
/// (`4:memory:/path`, `1:cpu,cpuacct:/path`).
fn own_path(membership: &str, controller: &str) -> Option<String> {
    membership.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        controllers
            .split(',')
            .any(|c| c == controller)
            .then(|| path.trim().to_owned())
    })
}

/// The directory of this process's own cgroup in the v1 hierarchy of `controller`, where
/// that hierarchy is mounted and this process's cgroup is visible in it (tests place their
/// step cgroups there).
#[cfg(test)]
pub(super) fn own_dir(mountinfo: &str, membership: &str, controller: &str) -> Option<PathBuf> {
    let mount = mount_of(mountinfo, controller)?;
    let own = own_path(membership, controller)?;
    let relative = Path::new(&own).strip_prefix(&mount.root).ok()?;
    Some(mount.point.join(relative))
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(io("cannot read", path))
}

/// `auto` on cgroup v1: the controller's own memory cgroup when it is its container's (it is
/// the root of the hierarchy as mounted here: the container was given that cgroup, writable).
/// On a host or under systemd the controller does not create cgroups in one it was not
/// given: `--step-cgroup DIR` names a delegated one.
pub(super) fn own() -> Result<Roots, CgroupError> {
    let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
    let membership = read(Path::new("/proc/self/cgroup"))?;
    let mount = mount_of(&mountinfo, "memory").ok_or(CgroupError::NotMounted)?;
    let own = own_path(&membership, "memory").ok_or(CgroupError::NotMember)?;
    if own != mount.root {
        return Err(CgroupError::NotNamespaced(own));
    }
    prepare(&mount.point)
}

/// `--step-cgroup DIR` (or `auto`'s own cgroup) on cgroup v1: DIR is in the memory
/// hierarchy; the cpu hierarchy's directory at the same place, when it exists, takes the CPU
/// limits. A probe cgroup proves both can be divided.
pub(super) fn prepare(memory: &Path) -> Result<Roots, CgroupError> {
    if !memory.join("memory.limit_in_bytes").exists() {
        return Err(CgroupError::NotACgroup(memory.to_owned()));
    }
    let cpu = read(Path::new("/proc/self/mountinfo"))
        .ok()
        .and_then(|mountinfo| cpu_counterpart(&mountinfo, memory))
        .filter(|cpu| cpu.join("cpu.cfs_quota_us").exists());
    let probe_name = format!("dagster-taskiq-probe-{}", std::process::id());
    let probe = create(
        &Roots {
            memory: memory.to_owned(),
            cpu: cpu.clone(),
        },
        &probe_name,
        Limits {
            memory: Some(GIB),
            cpu: Some(1000),
        },
    )?;
    for dir in probe {
        let _ = fs::remove_dir(dir);
    }
    Ok(Roots {
        memory: memory.to_owned(),
        cpu,
    })
}

/// The cpu hierarchy's directory at the place `memory` has in the memory hierarchy (it may
/// not exist).
pub(super) fn cpu_counterpart(mountinfo: &str, memory: &Path) -> Option<PathBuf> {
    let memory_mount = mount_of(mountinfo, "memory")?;
    let cpu_mount = mount_of(mountinfo, "cpu")?;
    let relative = memory.strip_prefix(&memory_mount.point).ok()?;
    Some(cpu_mount.point.join(relative))
}

/// Creates a step's cgroups (memory, and cpu when the limits have one and CPU is enforced)
/// named `name`, with its limits; returns their directories, memory first. Nothing is left
/// behind on an error.
pub(super) fn create(
    roots: &Roots,
    name: &str,
    limits: Limits,
) -> Result<Vec<PathBuf>, CgroupError> {
    let memory = roots.memory.join(name);
    fs::create_dir(&memory).map_err(io("cannot create", &memory))?;
    let mut dirs = vec![memory.clone()];
    let write = |dir: &Path, file: &str, value: String| {
        let path = dir.join(file);
        fs::write(&path, value).map_err(io("cannot write", &path))
    };
    let result = (|| {
        if let Some(bytes) = limits.memory {
            write(&memory, "memory.limit_in_bytes", bytes.to_string())?;
            // memory + swap at the same figure: no swap (only with swap accounting, and only
            // once the memory limit is at most it).
            if memory.join("memory.memsw.limit_in_bytes").exists() {
                write(&memory, "memory.memsw.limit_in_bytes", bytes.to_string())?;
            }
        }
        if let (Some(millis), Some(cpu_root)) = (limits.cpu, &roots.cpu) {
            let cpu = cpu_root.join(name);
            fs::create_dir(&cpu).map_err(io("cannot create", &cpu))?;
            dirs.push(cpu.clone());
            write(&cpu, "cpu.cfs_period_us", CPU_PERIOD_US.to_string())?;
            let quota = u64::from(millis) * CPU_PERIOD_US / 1000;
            write(&cpu, "cpu.cfs_quota_us", quota.to_string())?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(dirs),
        Err(e) => {
            for dir in &dirs {
                let _ = fs::remove_dir(dir);
            }
            Err(e)
        }
    }
}

/// SIGKILLs every process left in `dir` (v1 has no `cgroup.kill`).
pub(super) fn kill_all(dir: &Path) {
    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill(2) has no memory effects; the pid was in the step's cgroup just now.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw,relatime shared:7 - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hierarchies_and_membership_are_read_from_proc() {
        let memory = mount_of(MOUNTINFO, "memory").unwrap();
        assert_eq!(memory.point, Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(memory.root, "/docker/abc");
        let cpu = mount_of(MOUNTINFO, "cpu").unwrap();
        assert_eq!(cpu.point, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert!(mount_of(MOUNTINFO, "pids").is_none());
        let membership =
            "12:pids:/docker/abc\n4:memory:/docker/abc\n1:cpu,cpuacct:/docker/abc\n0::/\n";
        assert_eq!(
            own_path(membership, "memory").as_deref(),
            Some("/docker/abc")
        );
        assert_eq!(own_path(membership, "cpu").as_deref(), Some("/docker/abc"));
        assert_eq!(own_path("0::/\n", "memory"), None);
    }
}
