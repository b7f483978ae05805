"""Every kernel file: one kernel named after the file, OpenCL C 1.2 without extensions
(no extension pragmas, no double), and it builds with warnings as errors."""

from __future__ import annotations

import re

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
