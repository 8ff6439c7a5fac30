"""The native kernels built for aarch64 and executed under qemu-user, with and without the
dot-product extension, against the checks of the C driver in tests/backends/arm/ and the test
vectors the torch reference writes on x86 (``arm/vectors.py``); the same driver and vectors
also run as a native build, so both architectures meet the same checks.  Needs
`gcc-aarch64-linux-gnu libgomp1-arm64-cross qemu-user` (.ci/run installs them where apt can)."""
import shutil
import subprocess
from pathlib import Path

import pytest

from edgesparse.backends.cpu import native

ARM = Path(__file__).parent / "arm"
DRIVER = [str(ARM / f) for f in ("check_quant.c", "check_ops.c", "check_vectors.c")]
SOURCES = [str(p) for p in native.SOURCES]
CROSS, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
SYSROOT = "/usr/aarch64-linux-gnu"


def _build(cc, march, out):
    r = subprocess.run([cc, "-O2", f"-march={march}", "-fopenmp", "-std=c11", f"-I{native.CSRC}", *DRIVER,
                        *SOURCES, "-o", str(out), "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    import sys
    sys.path.insert(0, str(ARM))
    from vectors import make
    return make(tmp_path_factory.mktemp("vectors") / "vectors.bin")


def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
    assert " 0 stored vectors" not in r.stdout and "stored vectors" in r.stdout, r.stdout


def test_native_build_meets_the_checks(tmp_path, vectors):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    _build(cc, "native", tmp_path / "check")
    _run([str(tmp_path / "check"), str(vectors)])


@pytest.mark.skipif(CROSS is None or QEMU is None, reason="no aarch64 cross compiler or qemu-aarch64")
@pytest.mark.parametrize("march", ["armv8.2-a+dotprod", "armv8-a"])
def test_aarch64_build_meets_the_checks_under_qemu(tmp_path, march, vectors):
    _build(CROSS, march, tmp_path / "check")
    if march.endswith("+dotprod"):   # the NEON sdot path is what this build runs
        dis = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(tmp_path / "check")],
                             capture_output=True, text=True).stdout
        assert "sdot" in dis
    _run([QEMU, "-L", SYSROOT, str(tmp_path / "check"), str(vectors)])
