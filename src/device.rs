//! Which dfdx device the models run on: the CPU always; one NVIDIA GPU when the crate is built
//! with the `cuda` feature (README, "CUDA build").
//!
//! Code that runs on either is generic over the device (`D: FusedOps + GradBuffers`);
//! [`on_device!`](crate::on_device) picks the instance at run time.

use serde::{Deserialize, Serialize};

/// A device choice (`--device cpu|cuda`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// dfdx's CPU device with this crate's fused kernels (the default).
    #[default]
    Cpu,
    /// GPU 0 through dfdx's CUDA device (needs a build with `--features cuda`).
    Cuda,
}

impl std::str::FromStr for DeviceKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" => Ok(DeviceKind::Cuda),
            other => anyhow::bail!("unknown device {other:?} (expected cpu or cuda)"),
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        })
    }
}

/// GPU 0 (dfdx's CUDA device, its random stream seeded with `seed`).
#[cfg(feature = "cuda")]
pub fn cuda(seed: u64) -> anyhow::Result<dfdx::prelude::Cuda> {
    dfdx::prelude::Cuda::try_build(0, seed)
        .map_err(|e| anyhow::anyhow!("opening CUDA device 0: {e:?} (is a GPU visible, and its driver loaded?)"))
}

/// The error of asking a CPU-only build for the GPU.
pub fn no_cuda() -> anyhow::Error {
    anyhow::anyhow!(
        "this binary was built without the `cuda` feature; build it with `--features cuda` (README, \"CUDA build\")"
    )
}

/// Runs `$body` with `$dev` bound to a reference to the device `$kind` names: `Cpu`, or (with
/// the `cuda` feature) GPU 0; without the feature, `Cuda` evaluates to `Err(no_cuda())`. The
/// body is instantiated once per device, so it must be generic code returning
/// `anyhow::Result<_>`.
#[macro_export]
macro_rules! on_device {
    ($kind:expr, $dev:ident => $body:expr) => {
        match $kind {
            $crate::device::DeviceKind::Cpu => {
                let $dev = &dfdx::prelude::Cpu::default();
                $body
            }
            $crate::device::DeviceKind::Cuda => {
                #[cfg(feature = "cuda")]
                {
                    let $dev = &$crate::device::cuda(0)?;
                    $body
                }
                #[cfg(not(feature = "cuda"))]
                {
                    Err($crate::device::no_cuda())
                }
            }
        }
    };
}
