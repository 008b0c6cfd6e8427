//! Choosing where tensors live: `cpu` (burn-flex, the default), `ndarray` (burn-ndarray, kept
//! selectable for comparison) or `gpu` (a burn GPU backend, with the `gpu` cargo feature), and
//! the rayon pool that bounds how many CPU threads the math uses.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

use crate::error::{Result, TrainerError};

/// The compute backends a user can pick with `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum DeviceKind {
    /// burn-flex on the CPU.
    #[default]
    Cpu,
    /// burn-ndarray on the CPU (deprecated upstream, kept for comparison).
    Ndarray,
    /// A burn GPU backend (wgpu); needs the `gpu` cargo feature and a GPU.
    Gpu,
}

impl DeviceKind {
    /// The backend's name as recorded with every delta (verification compares exactly only
    /// between equal backends).
    pub fn backend_name(self) -> &'static str {
        match self {
            Self::Cpu => "flex",
            Self::Ndarray => "ndarray",
            Self::Gpu => "wgpu",
        }
    }

    /// The burn device for this backend, without autodiff.
    pub fn device(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::flex()),
            #[allow(deprecated)] // selectable on purpose, see the module doc
            Self::Ndarray => Ok(Device::ndarray()),
            Self::Gpu => gpu_device(),
        }
    }
}

#[cfg(not(feature = "gpu"))]
fn gpu_device() -> Result<Device> {
    Err(TrainerError::InvalidInput(
        "this swarmtune was built without GPU support; rebuild with `--features gpu`, or use --device cpu".into(),
    ))
}

#[cfg(feature = "gpu")]
fn gpu_device() -> Result<Device> {
    // wgpu panics when it finds no adapter. Probe the device once with a tiny op and turn a
    // panic into an error that says what to do, with the panic's own message kept quiet.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let probe = std::panic::catch_unwind(|| {
        let device = Device::wgpu(Default::default());
        let _ = burn::tensor::Tensor::<1>::zeros([1], &device).into_data();
        device
    });
    std::panic::set_hook(hook);
    probe.map_err(|e| {
        let why = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "no reason given".into());
        TrainerError::Device(format!("no usable GPU was found ({why}); use --device cpu"))
    })
}

impl FromStr for DeviceKind {
    type Err = TrainerError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" | "flex" => Ok(Self::Cpu),
            "ndarray" => Ok(Self::Ndarray),
            "gpu" | "wgpu" => Ok(Self::Gpu),
            other => Err(TrainerError::InvalidInput(format!(
                "unknown device {other:?}: use cpu, ndarray or gpu"
            ))),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Ndarray => "ndarray",
            Self::Gpu => "gpu",
        })
    }
}

/// A pool of `threads` CPU threads; math run inside [`ThreadPool::install`] uses only those.
pub struct ThreadPool {
    pool: rayon::ThreadPool,
    threads: usize,
}

impl ThreadPool {
    /// A pool of `threads` threads (0 means one per available core).
    pub fn new(threads: usize) -> Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("swarmtune-math-{i}"))
            .build()
            .map_err(|e| TrainerError::Device(format!("cannot start {threads} threads: {e}")))?;
        Ok(Self { pool, threads })
    }

    /// Number of threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` with this pool as the one burn's CPU kernels split work across.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }
}
