//! Where a shard computes: `cpu`, `cuda` or `cuda:N`, and how much memory a GPU has free.
//!
//! A build without the `cuda` feature still understands the CUDA names, so that asking such a
//! build for a GPU says how to get one instead of "unknown device".

use crate::{Error, Result};
use candle_core::Device;

/// What a build without the `cuda` feature answers when asked for a GPU.
pub const NO_CUDA: &str = "this build has no CUDA support; build with --features cuda (scripts/build-cuda.sh)";

/// The device named by `spec`: `cpu`, `cuda` (GPU 0) or `cuda:N` (GPU N, as the driver numbers
/// them, i.e. after `CUDA_VISIBLE_DEVICES`).
pub fn parse_device(spec: &str) -> Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match spec.strip_prefix("cuda:") {
            Some(n) => n
                .parse::<usize>()
                .map_err(|_| Error::config("device", format!("`{spec}`: the GPU index must be a number, as in cuda:0")))?,
            None => return Err(Error::config("device", format!("`{spec}` is not a device: use cpu, cuda or cuda:N"))),
        },
    };
    cuda(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| Error::config("device", format!("cuda:{ordinal}: {}", crate::brief(&e))))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_ordinal: usize) -> Result<Device> {
    Err(Error::config("device", NO_CUDA))
}

/// `(total, free)` bytes of the GPU behind `device`; `None` for the CPU, and when the driver
/// cannot tell.
pub fn memory(device: &Device) -> Option<(u64, u64)> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
            Some((total as u64, free as u64))
        }
        _ => None,
    }
}

/// The memory this process may use: (total, available). The machine's, from /proc/meminfo,
/// capped by the memory limit of the process's cgroup (v2 or v1) when one is set, as in a
/// container or a Kubernetes pod: a worker is never planned past its limit and OOM-killed.
pub fn host_memory() -> (u64, u64) {
    let machine = meminfo(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default());
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    cap_by_cgroup(machine, cgroup_memory(&own, &mounts))
}

/// (MemTotal, MemAvailable) in bytes from the text of /proc/meminfo (0 where unknown).
fn meminfo(text: &str) -> (u64, u64) {
    let field = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// The machine's (total, available) capped by a cgroup's (limit, usage): the total is at most
/// the limit, and what is available at most what the limit leaves.
fn cap_by_cgroup((total, available): (u64, u64), cgroup: Option<(u64, u64)>) -> (u64, u64) {
    match cgroup {
        Some((limit, usage)) if limit < total || total == 0 => {
            let left = limit.saturating_sub(usage);
            (limit, if available == 0 { left } else { available.min(left) })
        }
        _ => (total, available),
    }
}

/// The tightest memory limit over this process's cgroup and its ancestors, and the usage of the
/// cgroup that sets it: `(limit, usage)` in bytes, or `None` when no limit is set or the files
/// cannot be read. `own` is the text of /proc/self/cgroup and `mounts` of /proc/self/mountinfo.
fn cgroup_memory(own: &str, mounts: &str) -> Option<(u64, u64)> {
    // v1: "N:...memory...:/path" under the memory controller's own mount; otherwise v2:
    // "0::/path", the one hierarchy mounted as cgroup2. The v1 line wins on hybrid systems,
    // where the v2 hierarchy holds no memory controller.
    let line = |want: &dyn Fn(&str) -> bool| {
        own.lines().find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            want(controllers).then(|| path.to_string())
        })
    };
    let (mount, root, path, v2) = match line(&|c| c.split(',').any(|c| c == "memory")) {
        Some(path) => {
            let (mount, root) = cgroup_mount(mounts, |fs, opts| fs == "cgroup" && opts.split(',').any(|o| o == "memory"))?;
            (mount, root, path, false)
        }
        None => {
            let path = line(&|c| c.is_empty())?;
            let (mount, root) = cgroup_mount(mounts, |fs, _| fs == "cgroup2")?;
            (mount, root, path, true)
        }
    };
    let (limit_file, usage_file) = if v2 { ("memory.max", "memory.current") } else { ("memory.limit_in_bytes", "memory.usage_in_bytes") };
    // Inside a cgroup namespace the path is relative to the mount's root; otherwise it starts
    // with it.
    let relative = path.strip_prefix(root.as_str()).unwrap_or(&path).trim_matches('/').to_string();
    let mut dir = std::path::PathBuf::from(&mount).join(&relative);
    let mut best: Option<(u64, u64)> = None;
    loop {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok().map(|t| t.trim().to_string());
        // "max" (v2) or a number near i64::MAX (v1): no limit at this level.
        if let Some(limit) = read(limit_file).and_then(|t| t.parse::<u64>().ok()).filter(|&l| l < 1 << 62) {
            if best.is_none_or(|(b, _)| limit < b) {
                let usage = read(usage_file).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
                best = Some((limit, usage));
            }
        }
        if dir == std::path::Path::new(&mount) || !dir.pop() {
            return best;
        }
    }
}

/// The mount point and the root within the hierarchy of the first cgroup mount that `wanted`
/// accepts (by filesystem type and super options), from /proc/self/mountinfo.
fn cgroup_mount(mounts: &str, wanted: impl Fn(&str, &str) -> bool) -> Option<(String, String)> {
    mounts.lines().find_map(|line| {
        // "id parent major:minor root mount-point options [optional...] - fstype source super-options"
        let (left, right) = line.split_once(" - ")?;
        let left: Vec<&str> = left.split(' ').collect();
        let mut right = right.split(' ');
        let (fs, _source, opts) = (right.next()?, right.next()?, right.next().unwrap_or(""));
        if !wanted(fs, opts) {
            return None;
        }
        Some((left.get(4)?.to_string(), left.get(3)?.to_string()))
    })
}

/// (total, free) memory of `device`: the GPU's, or the machine's for the CPU.
pub fn memory_of(device: &Device) -> (u64, u64) {
    memory(device).unwrap_or_else(host_memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// A cgroup hierarchy in a temporary folder: `files` as (path under the mount, text), and
    /// the mountinfo line that mounts it (`fs` and `opts` its type and super options, `root` its
    /// root within the hierarchy).
    fn hierarchy(files: &[(&str, &str)], root: &str, fs: &str, opts: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let mounts = format!(
            "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw\n30 22 0:26 {root} {} rw,nosuid shared:4 - {fs} cgroup {opts}\n",
            dir.path().display()
        );
        (dir, mounts)
    }

    #[test]
    fn a_cgroup_v2_limit_caps_what_the_machine_offers() {
        // A container in its own cgroup namespace: its cgroup is the mount's root.
        let (_dir, mounts) = hierarchy(&[("memory.max", "2147483648\n"), ("memory.current", "536870912\n")], "/", "cgroup2", "rw");
        let cg = cgroup_memory("0::/\n", &mounts);
        assert_eq!(cg, Some((2 * GIB, GIB / 2)));
        // A worker under a 2 GiB limit on a 24 GiB machine sizes itself within 2 GiB, less what
        // it already uses, so its budget (a share of that) is planned within the limit.
        assert_eq!(cap_by_cgroup((24 * GIB, 20 * GIB), cg), (2 * GIB, 2 * GIB - GIB / 2));
        // The machine's own figure wins when it is the smaller.
        assert_eq!(cap_by_cgroup((24 * GIB, GIB), cg), (2 * GIB, GIB));
    }

    #[test]
    fn the_tightest_limit_among_ancestors_counts() {
        let (_dir, mounts) = hierarchy(
            &[
                ("kubepods/memory.max", "1073741824"),
                ("kubepods/memory.current", "1000"),
                ("kubepods/pod1/memory.max", "max"),
                ("kubepods/pod1/ctr/memory.max", "4294967296"),
                ("kubepods/pod1/ctr/memory.current", "5"),
            ],
            "/",
            "cgroup2",
            "rw",
        );
        assert_eq!(cgroup_memory("0::/kubepods/pod1/ctr\n", &mounts), Some((GIB, 1000)));
    }

    #[test]
    fn cgroup_v1_reads_the_memory_controller() {
        // Docker without a cgroup namespace: the path repeats the mount's root.
        let (_dir, mounts) = hierarchy(
            &[("memory.limit_in_bytes", "3221225472"), ("memory.usage_in_bytes", "1073741824")],
            "/docker/abc",
            "cgroup",
            "rw,memory",
        );
        let own = "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n";
        assert_eq!(cgroup_memory(own, &mounts), Some((3 * GIB, GIB)));
        // Hybrid: the v2 line first, with a v2 hierarchy that holds no memory controller.
        let hybrid = format!("{mounts}31 22 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n");
        assert_eq!(cgroup_memory("0::/docker/abc\n4:memory:/docker/abc\n", &hybrid), Some((3 * GIB, GIB)));
    }

    #[test]
    fn no_limit_leaves_the_machine_figures() {
        let (_dir, mounts) = hierarchy(&[("memory.max", "max"), ("memory.current", "5")], "/", "cgroup2", "rw");
        assert_eq!(cgroup_memory("0::/\n", &mounts), None);
        // v1 writes a number near i64::MAX for "no limit".
        let (_dir, mounts) = hierarchy(&[("memory.limit_in_bytes", "9223372036854771712")], "/", "cgroup", "rw,memory");
        assert_eq!(cgroup_memory("4:memory:/\n", &mounts), None);
        assert_eq!(cgroup_memory("", ""), None);
        assert_eq!(cap_by_cgroup((24 * GIB, 20 * GIB), None), (24 * GIB, 20 * GIB));
        // A limit above the machine's memory changes nothing.
        assert_eq!(cap_by_cgroup((24 * GIB, 20 * GIB), Some((64 * GIB, 0))), (24 * GIB, 20 * GIB));
    }

    #[test]
    fn meminfo_is_read_in_bytes() {
        assert_eq!(meminfo("MemTotal:       1024 kB\nMemFree: 1 kB\nMemAvailable:    512 kB\n"), (1 << 20, 1 << 19));
    }

    fn message(spec: &str) -> String {
        parse_device(spec).expect_err(spec).to_string()
    }

    #[test]
    fn cpu_is_the_cpu() {
        assert!(matches!(parse_device("cpu").unwrap(), Device::Cpu));
        assert_eq!(memory(&Device::Cpu), None);
    }

    #[test]
    fn unknown_names_say_what_is_accepted() {
        for spec in ["gpu", "", "CPU", "cuda0", "metal"] {
            let m = message(spec);
            assert!(m.starts_with("device: "), "{m}");
            assert!(m.contains(&format!("`{spec}`")) && m.contains("cpu, cuda or cuda:N"), "{m}");
        }
    }

    #[test]
    fn a_gpu_index_must_be_a_number() {
        for spec in ["cuda:", "cuda:x", "cuda:-1", "cuda:1.5"] {
            let m = message(spec);
            assert!(m.contains(&format!("`{spec}`")) && m.contains("must be a number"), "{m}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_feature_cuda_says_how_to_build_it() {
        for spec in ["cuda", "cuda:0", "cuda:3"] {
            let m = message(spec);
            assert_eq!(m, format!("device: {NO_CUDA}"));
            assert!(m.contains("--features cuda") && m.contains("scripts/build-cuda.sh"));
        }
    }
}
