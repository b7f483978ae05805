"""Every kernel file: one kernel named after the file, OpenCL C 1.2 without extensions
(no extension pragmas, no double), and it builds with warnings as errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from cl_reference import KERNELS

pytestmark = pytest.mark.opencl

SOURCES = sorted(KERNELS.glob("*.cl"))


def code_only(text: str) -> str:
    """The source without comments (so prose may mention `double`)."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


@pytest.mark.parametrize("path", SOURCES + [KERNELS / "common.h"], ids=lambda p: p.name)
def test_source_is_plain_opencl_c_1_2(path):
    code = code_only(path.read_text())
    assert "#pragma OPENCL EXTENSION" not in code
    assert not re.search(r"\bdouble\b", code), "fp64 is an extension"
    # `half` only as a pointer target (cl_khr_fp16 would be needed for half values).
    for m in re.finditer(r"\bhalf\b(\s*\*)?", code):
        assert m.group(1), f"a half value (not pointer) at: {code[m.start():m.start() + 40]!r}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_one_kernel_named_after_the_file(clenv, path):
    code = code_only(path.read_text())
    names = re.findall(r"__kernel\s+void\s+(\w+)", code)
    assert names == [path.stem]
    # Builds without warnings (HEAD_DIM for the attention kernels).
    prg = clenv.cl.Program(clenv.ctx, path.read_text())
    prg.build(options=["-cl-std=CL1.2", "-cl-fp32-correctly-rounded-divide-sqrt", "-I", str(KERNELS), "-DHEAD_DIM=64", "-Werror"])


# PoCL's x86 kernel library variants (POCL_KERNELLIB_NAME, read once per process) and the CPU
# each compiles for, as the device name shows it. PoCL compiles for the host's variant, so a
# kernel that passes or returns a vector wider than the target's registers across any call
# (float8 without AVX, float16 / int16 without AVX-512; builtins such as fma, vload16 or
# convert_int16 included) builds here with AVX-512 and fails with -Werror on an AVX2 host.
KERNEL_LIBRARIES = {"sse2": "athlon64", "avx": "sandybridge", "avx2": "haswell", "avx512": "skylake-avx512"}

# The -D sets built besides the defaults: the tiled kernel's other shapes and vector widths,
# the host's Q4_1 rows and both Q4_1 forms, the other Q8_0 orders.
EXTRA_BUILDS = [
    ("matmul_f32_f32_tiled", ["-DWORK_N=8"]),
    ("matmul_f32_f32_tiled", ["-DMAX_VW=8"]),
    ("matmul_f32_f32_tiled", ["-DMAX_VW=4"]),
    ("matmul_f32_f32_tiled", ["-DWORK_M=4", "-DWORK_N=4", "-DTILE_K=16", "-DPAD_X=1", "-DPAD_W=4"]),
    ("matmul_f32_f32_tiled", ["-DTILE_M=3", "-DTILE_N=6", "-DTILE_K=4", "-DWORK_M=1", "-DWORK_N=2"]),
    ("matmul_q4_1_q8_1", ["-DROWS=8"]),
    ("matmul_q4_1_q8_1", ["-DROWS=8", "-DQ4_1_INT16=0"]),
    ("matmul_q8_0_q8_0", ["-DQ8_0_ORDER=0"]),
    ("matmul_q8_0_q8_0", ["-DQ8_0_ORDER=1"]),
]

_BUILD_EVERY_KERNEL = r"""
import json, sys
import pyopencl as cl

kernels, options, builds = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
platforms = [p for p in cl.get_platforms() if "portable computing language" in p.name.lower()]
device = platforms[0].get_devices()[0]
ctx = cl.Context([device])
failures = {}
for name, extra in builds:
    label = " ".join([name + ".cl"] + extra)
    try:
        cl.Program(ctx, open(f"{kernels}/{name}.cl").read()).build(options=options + extra)
    except cl.Error as e:
        lines = [l.strip() for l in str(e).splitlines()]
        first = next((l for l in lines if "error:" in l or "warning:" in l), lines[0] if lines else repr(e))
        failures[label] = first
print(json.dumps({"device": device.name, "failures": failures}))
"""


@pytest.mark.parametrize("library", list(KERNEL_LIBRARIES))
def test_every_kernel_builds_for_every_x86_kernel_library(clenv, tmp_path, library):
    """Every kernel builds warning-free (-Werror) whatever x86-64 CPU PoCL compiles for, one
    process per kernel library variant (PoCL reads POCL_KERNELLIB_NAME once), with the
    kernel cache off so that every build is compiled."""
    import platform as host

    if "portable computing language" not in clenv.device.platform.name.lower():
        pytest.skip(f"POCL_KERNELLIB_NAME is PoCL's; the device is {clenv.device.name} ({clenv.device.platform.name})")
    if host.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"PoCL's x86 kernel libraries need an x86-64 host, not {host.machine()}")
    options = ["-cl-std=CL1.2", "-cl-fp32-correctly-rounded-divide-sqrt", "-I", str(KERNELS), "-DHEAD_DIM=64", "-Werror"]
    builds = [(p.stem, []) for p in SOURCES] + EXTRA_BUILDS
    env = dict(os.environ, POCL_KERNELLIB_NAME=library, POCL_KERNEL_CACHE="0", POCL_CACHE_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", _BUILD_EVERY_KERNEL, str(KERNELS), json.dumps(options), json.dumps(builds)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, f"the build process under POCL_KERNELLIB_NAME={library} failed:\n{done.stderr[-2000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    cpu = KERNEL_LIBRARIES[library]
    if cpu not in result["device"]:
        pytest.skip(f"this PoCL has no {library} kernel library (it compiled for {result['device']}, not {cpu})")
    failures = result["failures"]
    assert not failures, f"{len(failures)} build(s) fail under POCL_KERNELLIB_NAME={library} ({result['device']}):\n" + "\n".join(
        f"  {label}: {first}" for label, first in failures.items()
    )
