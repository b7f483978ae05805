"""Fixtures for the OpenCL kernel tests: one OpenCL device (PoCL first), programs built
once per session, a fresh random seed per test (printed and recorded, so a failure can be
replayed with FERROSERVE_KERNEL_SEED=<seed>), and buffers poisoned before every run.

Without pyopencl or an OpenCL platform every test here skips with the reason; `make test`
installs both (the Makefile's `$(VENV)/.opencl` target).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field

import numpy as np
import pytest

from cl_reference import KERNELS

# Options every kernel is built with (see kernels/common.h): OpenCL C 1.2, and IEEE division
# and sqrt, which the bitwise kernels need (OpenCL otherwise allows 2.5 / 3 ulp). No fast-math
# flags: the kernels rely on no contraction and on IEEE semantics.
BUILD_OPTIONS = ["-cl-std=CL1.2", "-cl-fp32-correctly-rounded-divide-sqrt", "-I", str(KERNELS)]


def _find_device():
    """(device, None) or (None, reason to skip)."""
    try:
        import pyopencl as cl
    except ImportError as e:  # pragma: no cover - depends on the machine
        return None, f"pyopencl is not installed ({e}); `make test` installs it with PoCL"
    try:
        platforms = cl.get_platforms()
    except cl.Error as e:  # the ICD loader finds no platform
        return None, f"no OpenCL platform ({e}); install pocl-opencl-icd (`make test` does)"
    devices = [(p, d) for p in platforms for d in p.get_devices()]
    if not devices:
        return None, "OpenCL platforms found but no device; install pocl-opencl-icd"
    wanted = os.environ.get("FERROSERVE_OPENCL_PLATFORM", "portable computing language").lower()
    devices.sort(key=lambda pd: wanted not in pd[0].name.lower())
    return devices[0][1], None


@dataclass
class CLEnv:
    cl: object
    device: object
    ctx: object
    queue: object
    programs: dict = field(default_factory=dict)

    @property
    def ieee_fp32(self) -> bool:
        """Whether the device promises what the bitwise kernels need: round to nearest,
        correctly rounded division and sqrt (under -cl-fp32-correctly-rounded-divide-sqrt)
        and denormals (subnormal softmax weights and activations occur). fma is correctly
        rounded on every OpenCL device (emulated if need be)."""
        cfg = self.device.single_fp_config
        fp = self.cl.device_fp_config
        need = fp.ROUND_TO_NEAREST | fp.CORRECTLY_ROUNDED_DIVIDE_SQRT | fp.DENORM
        return (cfg & need) == need

    def kernel(self, name: str, **defines: int):
        """The kernel `name` from kernels/<name>.cl, built once per session and defines."""
        key = (name, tuple(sorted(defines.items())))
        if key not in self.programs:
            src = (KERNELS / f"{name}.cl").read_text()
            opts = BUILD_OPTIONS + [f"-D{k}={v}" for k, v in sorted(defines.items())]
            program = self.cl.Program(self.ctx, src).build(options=opts)
            self.programs[key] = self.cl.Kernel(program, name)
        return self.programs[key]

    def kernel_from_source(self, source: str, name: str, **defines: int):
        """A test-only kernel (e.g. one exposing a common.h function), cached likewise."""
        key = (source, tuple(sorted(defines.items())))
        if key not in self.programs:
            opts = BUILD_OPTIONS + [f"-D{k}={v}" for k, v in sorted(defines.items())]
            self.programs[key] = self.cl.Kernel(self.cl.Program(self.ctx, source).build(options=opts), name)
        return self.programs[key]

    def to_device(self, array: np.ndarray):
        mf = self.cl.mem_flags
        a = np.ascontiguousarray(array)
        return self.cl.Buffer(self.ctx, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=a if a.nbytes else np.zeros(1, np.uint8))

    def poisoned(self, shape, dtype=np.float32):
        """A device buffer filled with a value no kernel writes on purpose: NaN for floats,
        the most negative value for integers (-128 for the Q8 codes, which are clamped to
        +-127), 0x7e00 (an f16 NaN) for uint16 caches."""
        dtype = np.dtype(dtype)
        if dtype.kind == "f":
            fill = np.full(shape, np.nan, dtype)
        elif dtype == np.uint16:
            fill = np.full(shape, 0x7E00, dtype)
        else:
            fill = np.full(shape, np.iinfo(dtype).min, dtype)
        return self.to_device(fill), fill

    def read(self, buf, like: np.ndarray) -> np.ndarray:
        out = np.empty_like(like)
        self.cl.enqueue_copy(self.queue, out, buf)
        self.queue.finish()
        return out

    def run(self, kernel, global_size, local_size, *args) -> None:
        kernel(self.queue, tuple(global_size), None if local_size is None else tuple(local_size), *args)
        self.queue.finish()


@pytest.fixture(scope="session")
def clenv() -> CLEnv:
    device, reason = _find_device()
    if device is None:
        pytest.skip(reason)
    import pyopencl as cl

    ctx = cl.Context([device])
    env = CLEnv(cl=cl, device=device, ctx=ctx, queue=cl.CommandQueue(ctx))
    print(f"OpenCL device: {device.name} ({device.platform.name}, {device.version})")
    return env


@pytest.fixture
def bitwise(clenv: CLEnv) -> None:
    """For tests that claim bitwise equality with the CPU kernels' arithmetic."""
    if not clenv.ieee_fp32:
        pytest.skip(f"{clenv.device.name} lacks round-to-nearest, correctly rounded divide/sqrt or denormals")


@pytest.fixture(scope="session")
def libm_expf():
    """glibc's expf through ctypes (what Rust's f32::exp calls on Linux), vectorised."""
    import ctypes

    try:
        libm = ctypes.CDLL("libm.so.6")
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError) as e:
        pytest.skip(f"glibc's libm is not available ({e}): the CPU kernels' expf is glibc's")
    major, minor = (int(v) for v in version.split(".")[:2])
    if (major, minor) < (2, 27):
        pytest.skip(f"glibc {version} predates the expf algorithm the kernels reproduce (2.27)")
    libm.expf.restype = ctypes.c_float
    libm.expf.argtypes = [ctypes.c_float]
    ufunc = np.frompyfunc(lambda v: libm.expf(float(v)), 1, 1)
    return lambda x: np.asarray(ufunc(np.asarray(x, np.float32)), dtype=np.float32)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A fresh generator per test; its seed is printed (shown with a failure) and recorded."""
    env_seed = os.environ.get("FERROSERVE_KERNEL_SEED")
    seed = int(env_seed) if env_seed else secrets.randbits(63)
    print(f"seed={seed} (replay with FERROSERVE_KERNEL_SEED={seed})")
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed)
