//! Where a shard computes: `cpu`, `cuda` or `cuda:N`, and how much memory a GPU has free.
//!
//! A build without the `cuda` feature still understands the CUDA names, so that asking such a
//! build for a GPU says how to get one instead of "unknown device".

use crate::{Error, Result};
use candle_core::Device;

/// What a build without the `cuda` feature answers when asked for a GPU.
pub const NO_CUDA: &str =
    "this build has no CUDA support; build with --features cuda (scripts/build-cuda.sh)";

/// The device named by `spec`: `cpu`, `cuda` (GPU 0) or `cuda:N` (GPU N, as the driver numbers
/// them, i.e. after `CUDA_VISIBLE_DEVICES`).
pub fn parse_device(spec: &str) -> Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match spec.strip_prefix("cuda:") {
            Some(n) => n.parse::<usize>().map_err(|_| {
                Error::config(
                    "device",
                    format!("`{spec}`: the GPU index must be a number, as in cuda:0"),
                )
            })?,
            None => {
                return Err(Error::config(
                    "device",
                    format!("`{spec}` is not a device: use cpu, cuda or cuda:N"),
                ))
            }
        },
    };
    cuda(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal)
        .map_err(|e| Error::config("device", format!("cuda:{ordinal}: {}", crate::brief(&e))))
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

/// The machine's memory: (total, available), from /proc/meminfo.
pub fn host_memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
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

/// (total, free) memory of `device`: the GPU's, or the machine's for the CPU.
pub fn memory_of(device: &Device) -> (u64, u64) {
    memory(device).unwrap_or_else(host_memory)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert!(
                m.contains(&format!("`{spec}`")) && m.contains("cpu, cuda or cuda:N"),
                "{m}"
            );
        }
    }

    #[test]
    fn a_gpu_index_must_be_a_number() {
        for spec in ["cuda:", "cuda:x", "cuda:-1", "cuda:1.5"] {
            let m = message(spec);
            assert!(
                m.contains(&format!("`{spec}`")) && m.contains("must be a number"),
                "{m}"
            );
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
