//! The OpenCL device: runs `kernels/*.cl` through an OpenCL ICD loaded at run time.
//!
//! `libOpenCL.so.1` is opened with `dlopen` on first use (opencl3's `dynamic` feature), never
//! linked: the crate builds with no OpenCL headers or libraries, and a process without an
//! ICD loader gets [`OpenClError::NoRuntime`] from [`list_devices`] / [`OpenClDevice::open`]
//! instead of failing to start. Nothing here panics when OpenCL is absent or broken.
//!
//! Shape: one context, one in-order command queue per device. Kernels come from the
//! sources embedded at build time ([`sources`]) or from precompiled program binaries (one
//! per kernel file, for FPGA bitstreams). Buffers live on the device; a model uploads its
//! weights once and per step enqueues kernels back to back, reading back only the final
//! result, through [`crate::OpenClBackend`] (`BertModel<OpenClBackend>`,
//! `LlamaModel<OpenClBackend>`). The host-slice
//! [`crate::Device`] trait is not implemented here on purpose: every call would copy
//! activations to and from the device between ops, which is exactly the round trip the
//! OpenCL path exists to avoid.

pub mod ops;
pub mod sources;

use std::ffi::c_void;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::{Mutex, MutexGuard};

use opencl3::command_queue::CommandQueue;
use opencl3::context::Context;
use opencl3::device::{Device as ClDevice, CL_DEVICE_TYPE_ALL, CL_DEVICE_TYPE_CPU, CL_FP_CORRECTLY_ROUNDED_DIVIDE_SQRT, CL_FP_DENORM, CL_FP_ROUND_TO_NEAREST};
use opencl3::error_codes::{error_text, ClError, CL_DEVICE_NOT_FOUND, DLOPEN_FUNCTION_NOT_AVAILABLE, DLOPEN_RUNTIME_LOAD_FAILED};
use opencl3::kernel::Kernel;
use opencl3::memory::{Buffer, ClMem, CL_MEM_READ_WRITE};
use opencl3::platform::get_platforms;
use opencl3::program::Program;
use opencl3::types::{cl_mem, CL_BLOCKING};

/// Options every kernel is built with (kernels/README.md): OpenCL C 1.2 and no fast-math
/// flags (the kernels rely on IEEE semantics and on no contraction).
const BASE_BUILD_OPTIONS: &str = "-cl-std=CL1.2";
/// Correctly rounded `/` and `sqrt` (OpenCL otherwise allows 2.5 / 3 ulp); only passed to
/// devices that report the capability, since the option is meaningless elsewhere.
const IEEE_DIV_SQRT_OPTION: &str = "-cl-fp32-correctly-rounded-divide-sqrt";

#[derive(Debug, thiserror::Error)]
pub enum OpenClError {
    #[error(
        "the OpenCL ICD loader (libOpenCL.so.1) cannot be loaded: install an OpenCL runtime \
         (e.g. apt-get install ocl-icd-libopencl1 pocl-opencl-icd) or use the CPU device"
    )]
    NoRuntime,
    #[error(
        "no OpenCL platform: the ICD loader found no vendor driver (see /etc/OpenCL/vendors, \
         or OCL_ICD_VENDORS); install one (e.g. pocl-opencl-icd) or use the CPU device"
    )]
    NoPlatform,
    #[error("OpenCL device {index} does not exist: {count} device(s) found ({names})")]
    NoSuchDevice { index: usize, count: usize, names: String },
    #[error("OpenCL {what} failed: {code} ({name})", name = error_text(*code))]
    Api { what: String, code: i32 },
    #[error("building kernel {kernel} on {device} failed: {log}")]
    Build { kernel: String, device: String, log: String },
    #[error("no precompiled binary for kernel {kernel} in {dir} (expected {kernel}.bin or {kernel}.aocx)")]
    MissingBinary { kernel: String, dir: PathBuf },
    #[error("cannot read kernel binary {path}: {reason}")]
    Binary { path: PathBuf, reason: String },
    #[error("unknown kernel {0} (not in kernels/)")]
    UnknownKernel(String),
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T, E = OpenClError> = std::result::Result<T, E>;

/// Maps an OpenCL status to our error; the dlopen failures get their own clear variants.
fn api(what: impl Into<String>) -> impl FnOnce(ClError) -> OpenClError {
    let what = what.into();
    move |e| match e.0 {
        DLOPEN_RUNTIME_LOAD_FAILED | DLOPEN_FUNCTION_NOT_AVAILABLE => OpenClError::NoRuntime,
        code => OpenClError::Api { what, code },
    }
}

/// One OpenCL device as `--device opencl:N` counts them: every platform's devices in the
/// ICD loader's platform order, numbered from 0 (pyopencl sees the same order).
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub index: usize,
    pub platform: String,
    pub name: String,
    pub version: String,
    pub global_mem_bytes: u64,
    pub compute_units: u32,
    pub max_work_group_size: usize,
    /// Round to nearest, correctly rounded divide/sqrt and denormals: what the bitwise
    /// (chat) kernels need to give the CPU's bits; the embedding kernels work without it.
    pub ieee_fp32: bool,
    /// A CPU device (such as PoCL's): work-items run as vectorised loops on a few cores,
    /// so kernels that repeat work across a work-group cost that work in full.
    pub is_cpu: bool,
}

/// Held around the driver's set-up calls (enumeration, context creation, program builds):
/// PoCL behind ocl-icd, initialised from several threads at once, answered one thread with
/// no devices and crashed another (seen in this crate's parallel tests). Set-up is rare, so
/// serialising it costs nothing; launches and transfers on a queue are not locked.
static SETUP_LOCK: Mutex<()> = Mutex::new(());

fn setup_lock() -> MutexGuard<'static, ()> {
    // A panic while holding it leaves no driver state of ours half-done: ignore poisoning.
    SETUP_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn all_devices() -> Result<Vec<(String, ClDevice)>> {
    let _setup = setup_lock();
    let platforms = match get_platforms() {
        Ok(p) => p,
        Err(ClError(code)) if code == DLOPEN_RUNTIME_LOAD_FAILED || code == DLOPEN_FUNCTION_NOT_AVAILABLE => return Err(OpenClError::NoRuntime),
        // ocl-icd answers CL_PLATFORM_NOT_FOUND_KHR when it has no vendor ICDs.
        Err(_) => return Err(OpenClError::NoPlatform),
    };
    if platforms.is_empty() {
        return Err(OpenClError::NoPlatform);
    }
    let mut out = Vec::new();
    for p in platforms {
        let pname = p.name().unwrap_or_else(|_| "?".into());
        // A platform without devices answers CL_DEVICE_NOT_FOUND: it simply adds none.
        let ids = match p.get_devices(CL_DEVICE_TYPE_ALL) {
            Ok(ids) => ids,
            Err(ClError(CL_DEVICE_NOT_FOUND)) => Vec::new(),
            Err(e) => return Err(api(format!("clGetDeviceIDs({pname})"))(e)),
        };
        out.extend(ids.into_iter().map(|id| (pname.clone(), ClDevice::new(id))));
    }
    Ok(out)
}

fn describe(index: usize, platform: String, d: &ClDevice) -> DeviceInfo {
    let fp = d.single_fp_config().unwrap_or(0);
    let need = CL_FP_ROUND_TO_NEAREST | CL_FP_CORRECTLY_ROUNDED_DIVIDE_SQRT | CL_FP_DENORM;
    DeviceInfo {
        index,
        platform,
        name: d.name().unwrap_or_else(|_| "?".into()).trim().to_string(),
        version: d.version().unwrap_or_default().trim().to_string(),
        global_mem_bytes: d.global_mem_size().unwrap_or(0),
        compute_units: d.max_compute_units().unwrap_or(0),
        max_work_group_size: d.max_work_group_size().unwrap_or(1),
        ieee_fp32: fp & need == need,
        is_cpu: d.dev_type().is_ok_and(|t| t & CL_DEVICE_TYPE_CPU != 0),
    }
}

/// Every OpenCL device, numbered as `--device opencl:N` counts them.
pub fn list_devices() -> Result<Vec<DeviceInfo>> {
    Ok(all_devices()?.into_iter().enumerate().map(|(i, (p, d))| describe(i, p, &d)).collect())
}

/// A device buffer of `len` elements of `T` (freed on drop by opencl3's `Buffer`).
pub struct DeviceBuffer<T> {
    buffer: Buffer<T>,
    len: usize,
}

impl<T> DeviceBuffer<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    fn mem(&self) -> cl_mem {
        self.buffer.get()
    }
}

/// An argument of a kernel launch, in the kernel's parameter order.
pub enum Arg<'a> {
    /// A buffer; the lifetime keeps it alive while the arguments are in use.
    Buf(cl_mem, PhantomData<&'a ()>),
    /// A NULL `__global` pointer (optional inputs such as `bias` or `residual`).
    Null,
    U32(u32),
    F32(f32),
    /// `__local` scratch of this many bytes.
    Local(usize),
}

impl<'a> Arg<'a> {
    pub fn buf<T>(b: &'a DeviceBuffer<T>) -> Self {
        Arg::Buf(b.mem(), PhantomData)
    }
    pub fn opt_buf<T>(b: Option<&'a DeviceBuffer<T>>) -> Self {
        b.map_or(Arg::Null, |b| Arg::Buf(b.mem(), PhantomData))
    }
}

/// A built kernel and the largest work-group it can run with on this device.
pub struct BuiltKernel {
    pub name: String,
    kernel: Kernel,
    pub max_work_group_size: usize,
    // Kept so the program outlives its kernel and its binary can be saved.
    program: Program,
}

/// Where kernels come from.
#[derive(Debug, Clone)]
pub enum KernelSource {
    /// Build the embedded sources for this device (the default).
    Embedded,
    /// Load `<dir>/<kernel>.bin` or `<dir>/<kernel>.aocx` (program binaries compiled offline
    /// for this device, e.g. FPGA bitstreams; their `-D` options were fixed when compiled).
    Binaries(PathBuf),
}

/// One OpenCL device with its context and its one in-order command queue.
pub struct OpenClDevice {
    pub info: DeviceInfo,
    device: ClDevice,
    context: Context,
    queue: CommandQueue,
}

impl OpenClDevice {
    /// Opens device `index` (see [`list_devices`]).
    pub fn open(index: usize) -> Result<Self> {
        let mut devices = all_devices()?;
        if index >= devices.len() {
            let names = devices.iter().map(|(p, d)| format!("{p}: {}", d.name().unwrap_or_default().trim())).collect::<Vec<_>>().join("; ");
            return Err(OpenClError::NoSuchDevice { index, count: devices.len(), names });
        }
        let (platform, device) = devices.swap_remove(index);
        let info = describe(index, platform, &device);
        let _setup = setup_lock();
        let context = Context::from_device(&device).map_err(api("clCreateContext"))?;
        // clCreateCommandQueue (OpenCL 1.x) rather than ...WithProperties (2.0): FPGA SDKs
        // and older GPUs are 1.2 devices. In order, no profiling: each op sees the previous
        // op's output without events or host waits.
        #[allow(deprecated)]
        let queue = unsafe { CommandQueue::create(&context, device.id(), 0) }.map_err(api("clCreateCommandQueue"))?;
        Ok(Self { info, device, context, queue })
    }

    pub fn name(&self) -> String {
        format!("opencl:{}({})", self.info.index, self.info.name)
    }

    fn build_options(&self, defines: &[(&str, String)]) -> String {
        let mut opts = BASE_BUILD_OPTIONS.to_string();
        if self.device.single_fp_config().unwrap_or(0) & CL_FP_CORRECTLY_ROUNDED_DIVIDE_SQRT != 0 {
            opts.push(' ');
            opts.push_str(IEEE_DIV_SQRT_OPTION);
        }
        for (k, v) in defines {
            opts.push_str(&format!(" -D{k}={v}"));
        }
        opts
    }

    /// Builds (or loads) kernel `name` with the given `-D` defines.
    pub fn kernel(&self, name: &str, defines: &[(&str, String)], from: &KernelSource) -> Result<BuiltKernel> {
        let _setup = setup_lock();
        let program = match from {
            KernelSource::Embedded => {
                let src = sources::source(name).ok_or_else(|| OpenClError::UnknownKernel(name.into()))?;
                let mut program = Program::create_from_source(&self.context, &src).map_err(api(format!("clCreateProgramWithSource({name})")))?;
                if program.build(&[self.device.id()], &self.build_options(defines)).is_err() {
                    let log = program.get_build_log(self.device.id()).unwrap_or_default();
                    return Err(OpenClError::Build { kernel: name.into(), device: self.info.name.clone(), log: log.trim().to_string() });
                }
                program
            }
            KernelSource::Binaries(dir) => {
                let path = ["bin", "aocx"]
                    .iter()
                    .map(|ext| dir.join(format!("{name}.{ext}")))
                    .find(|p| p.is_file())
                    .ok_or_else(|| OpenClError::MissingBinary { kernel: name.into(), dir: dir.clone() })?;
                let bytes = std::fs::read(&path).map_err(|e| OpenClError::Binary { path: path.clone(), reason: e.to_string() })?;
                let mut program = unsafe { Program::create_from_binary(&self.context, &[self.device.id()], &[&bytes]) }
                    .map_err(|e| OpenClError::Binary { path: path.clone(), reason: format!("clCreateProgramWithBinary: {}", error_text(e.0)) })?;
                // A binary still needs clBuildProgram (a no-op compile, but it links and checks).
                if program.build(&[self.device.id()], "").is_err() {
                    let log = program.get_build_log(self.device.id()).unwrap_or_default();
                    return Err(OpenClError::Build {
                        kernel: name.into(),
                        device: self.info.name.clone(),
                        log: format!("from {}: {}", path.display(), log.trim()),
                    });
                }
                program
            }
        };
        let kernel = Kernel::create(&program, name).map_err(api(format!("clCreateKernel({name})")))?;
        let max_work_group_size = kernel.get_work_group_size(self.device.id()).map_err(api(format!("CL_KERNEL_WORK_GROUP_SIZE({name})")))?;
        Ok(BuiltKernel { name: name.into(), kernel, max_work_group_size, program })
    }

    /// Writes `kernel`'s program binary for this device to `<dir>/<name>.bin` (what
    /// [`KernelSource::Binaries`] loads).
    pub fn save_binary(&self, kernel: &BuiltKernel, dir: &Path) -> Result<PathBuf> {
        let binaries = kernel.program.get_binaries().map_err(api("CL_PROGRAM_BINARIES"))?;
        let bytes = binaries
            .into_iter()
            .next()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| OpenClError::Unsupported(format!("{} returned no program binary for {}", self.info.name, kernel.name)))?;
        let path = dir.join(format!("{}.bin", kernel.name));
        std::fs::write(&path, bytes).map_err(|e| OpenClError::Binary { path: path.clone(), reason: e.to_string() })?;
        Ok(path)
    }

    /// A device buffer of `len` elements, uninitialised.
    pub fn alloc<T>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        // OpenCL refuses zero-sized buffers; an empty buffer is never read.
        let buffer = unsafe { Buffer::<T>::create(&self.context, CL_MEM_READ_WRITE, len.max(1), ptr::null_mut()) }
            .map_err(api(format!("clCreateBuffer({} bytes)", len * std::mem::size_of::<T>())))?;
        Ok(DeviceBuffer { buffer, len })
    }

    /// A device buffer holding a copy of `data` (blocking: `data` may be dropped after).
    pub fn upload<T>(&self, data: &[T]) -> Result<DeviceBuffer<T>> {
        let mut buf = self.alloc(data.len())?;
        self.write(&mut buf, data)?;
        Ok(buf)
    }

    /// Copies `data` into the start of `buf`. Blocking, so the caller's slice may change at
    /// once; it waits for earlier commands too, so call it before enqueueing a pass, not
    /// inside one.
    pub fn write<T>(&self, buf: &mut DeviceBuffer<T>, data: &[T]) -> Result<()> {
        if data.len() > buf.len {
            return Err(OpenClError::Unsupported(format!("write of {} elements into a buffer of {}", data.len(), buf.len)));
        }
        if data.is_empty() {
            return Ok(());
        }
        unsafe { self.queue.enqueue_write_buffer(&mut buf.buffer, CL_BLOCKING, 0, data, &[]) }.map_err(api("clEnqueueWriteBuffer"))?;
        Ok(())
    }

    /// Reads the first `out.len()` elements of `buf`, after every command enqueued before.
    pub fn read<T>(&self, buf: &DeviceBuffer<T>, out: &mut [T]) -> Result<()> {
        if out.len() > buf.len {
            return Err(OpenClError::Unsupported(format!("read of {} elements from a buffer of {}", out.len(), buf.len)));
        }
        if out.is_empty() {
            return Ok(());
        }
        unsafe { self.queue.enqueue_read_buffer(&buf.buffer, CL_BLOCKING, 0, out, &[]) }.map_err(api("clEnqueueReadBuffer"))?;
        Ok(())
    }

    /// Enqueues one launch (no wait). `global` is rounded up to a multiple of `local` per
    /// dimension when `local` is given (the kernels bounds-check their first index).
    pub fn launch(&self, k: &BuiltKernel, args: &[Arg<'_>], global: &[usize], local: Option<&[usize]>) -> Result<()> {
        for (i, a) in args.iter().enumerate() {
            let i = i as u32;
            let set = unsafe {
                match a {
                    Arg::Buf(m, _) => k.kernel.set_arg(i, m),
                    Arg::Null => k.kernel.set_arg(i, &(ptr::null_mut::<c_void>() as cl_mem)),
                    Arg::U32(v) => k.kernel.set_arg(i, v),
                    Arg::F32(v) => k.kernel.set_arg(i, v),
                    Arg::Local(bytes) => k.kernel.set_arg_local_buffer(i, *bytes),
                }
            };
            set.map_err(api(format!("clSetKernelArg({}, {i})", k.name)))?;
        }
        let global: Vec<usize> = match local {
            Some(l) => global.iter().zip(l).map(|(g, l)| g.div_ceil(*l) * l).collect(),
            None => global.to_vec(),
        };
        if global.contains(&0) {
            return Ok(()); // nothing to do (and OpenCL rejects empty ranges)
        }
        let local_ptr = local.map_or(ptr::null(), |l| l.as_ptr());
        unsafe { self.queue.enqueue_nd_range_kernel(k.kernel.get(), global.len() as u32, ptr::null(), global.as_ptr(), local_ptr, &[]) }
            .map_err(api(format!("clEnqueueNDRangeKernel({})", k.name)))?;
        Ok(())
    }

    /// Waits until every enqueued command has finished.
    pub fn finish(&self) -> Result<()> {
        self.queue.finish().map_err(api("clFinish"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHILD_ENV: &str = "FERROSERVE_TEST_CHILD_NO_PLATFORM";

    /// With no vendor driver (OCL_ICD_VENDORS = an empty directory) listing and opening
    /// devices are errors that say what to install, never a panic. The ICD loader reads the
    /// variable once per process, so the check runs in a child: this test binary, re-run.
    #[test]
    fn no_platform_is_a_clear_error_not_a_panic() {
        if std::env::var_os(CHILD_ENV).is_some() {
            let listed = list_devices().expect_err("no platform must be an error");
            let opened = OpenClDevice::open(0).err().expect("no platform must be an error");
            for e in [listed, opened] {
                assert!(matches!(e, OpenClError::NoPlatform | OpenClError::NoRuntime), "{e}");
                assert!(e.to_string().contains("pocl-opencl-icd"), "{e}");
            }
            return;
        }
        let empty = std::env::temp_dir().join(format!("ferroserve-no-icd-{}", std::process::id()));
        std::fs::create_dir_all(&empty).unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "opencl::tests::no_platform_is_a_clear_error_not_a_panic", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .env("OCL_ICD_VENDORS", &empty)
            .output()
            .unwrap();
        std::fs::remove_dir_all(&empty).unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && stdout.contains("1 passed"), "child failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    }

    /// An index past the last device names what exists instead of panicking.
    #[test]
    fn a_missing_device_index_is_a_clear_error() {
        let Ok(devices) = list_devices() else {
            eprintln!("SKIPPED: no OpenCL platform");
            return;
        };
        match OpenClDevice::open(devices.len()) {
            Err(OpenClError::NoSuchDevice { index, count, .. }) => {
                assert_eq!((index, count), (devices.len(), devices.len()))
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("device {} should not exist", devices.len()),
        }
    }
}
