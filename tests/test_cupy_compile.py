"""Every CUDA source of the cupy backend compiles with NVRTC (no GPU needed)."""
import os

import pytest

from backends.cupy_backend.compile import KERNEL_FILES, compile_source, kernel_source

# cupy is an optional extra; CI installs it (with the NVRTC wheel), so there it must import.
if os.environ.get("CI"):
    from cupy_backends.cuda.libs import nvrtc
else:
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="cupy is not installed")


def _nvrtc_loads():
    try:
        nvrtc.getVersion()
    except Exception as exc:  # the nvidia-cuda-nvrtc wheel is part of the test extra
        return str(exc)
    return None


# In CI the NVRTC wheel is installed by the test extra, so a missing library is a failure there.
pytestmark = pytest.mark.skipif(_nvrtc_loads() is not None and not os.environ.get("CI"), reason=f"NVRTC library not found: {_nvrtc_loads()}")


def test_every_kernel_file_is_listed():
    from importlib import resources

    on_disk = sorted(p.name for p in resources.files("backends.cupy_backend").joinpath("kernels").iterdir()
                     if p.name.endswith(".cu"))
    assert on_disk == sorted(KERNEL_FILES)


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("filename", KERNEL_FILES)
def test_kernel_compiles(filename, arch):
    ptx = compile_source(kernel_source(filename), arch, filename)
    assert b".entry" in ptx if isinstance(ptx, bytes) else ".entry" in ptx


def test_compile_error_is_reported_with_the_log():
    with pytest.raises(RuntimeError, match="does not compile"):
        compile_source('extern "C" __global__ void k() { undefined_name; }', "compute_90", "broken.cu")


def test_cupy_ops_module_imports_and_names_reference_ops():
    pytest.importorskip("cupy")
    import reference
    from backends.cupy_backend.ops import OPS

    assert OPS and set(OPS) <= set(reference.OPS)


def test_every_cupy_name_the_ops_use_exists_in_cupy():
    """The emulated Triangle runs ops.py against numpy, which has names cupy lacks; check
    every ``cp.<name>`` (and ``cp.<module>.<name>``) ops.py uses against the real module."""
    import ast
    from importlib import resources

    cupy = pytest.importorskip("cupy")
    tree = ast.parse(resources.files("backends.cupy_backend").joinpath("ops.py").read_text())
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cp":
            used.add((node.attr,))
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
              and isinstance(node.value.value, ast.Name) and node.value.value.id == "cp"):
            used.add((node.value.attr, node.attr))
    missing = []
    for path in sorted(used):
        obj = cupy
        for part in path:
            obj = getattr(obj, part, None)
        if obj is None:
            missing.append("cp." + ".".join(path))
    assert used and not missing, f"ops.py uses names cupy does not have: {missing}"
