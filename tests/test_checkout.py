"""The tree runs from a plain checkout (issue 22): ``git archive HEAD`` into an empty folder, the extension put in
place (copied from this checkout's build: building it there takes minutes on a small CPU box), then the
issue's acceptance command with ``PYTHONPATH=.``, and one Triton op under the CPU interpreter, whose kernels
must come from the copy's top-level ``kernels/`` (fastft.kernels without an install).

``git archive`` sees committed files only: uncommitted changes are not tested here."""
import glob
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCEPTANCE = ("import fastft, torch; "
              "fastft.ops.cross_entropy(torch.randn(4, 10), torch.tensor([1, 2, 3, 4]))")
TRITON_OP = """
import os, fastft, torch
assert os.path.dirname(fastft.kernels.__file__) == os.path.abspath("kernels"), fastft.kernels.__file__
x, w = torch.randn(3, 64), torch.ones(64)
with fastft.backend.use("triton"):
    assert fastft.ops.defs.rms_norm.rms_norm_op.select(x) == "triton"
    y = fastft.ops.rms_norm(x, w)
with fastft.backend.use("reference"):
    torch.testing.assert_close(y, fastft.ops.rms_norm(x, w))
print("triton ok", tuple(y.shape))
"""


def _archive_head(dest: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    inside = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True, text=True)
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        pytest.skip(f"{ROOT} is not a git checkout")
    tar_path = dest.parent / "head.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(tar_path), "HEAD"], cwd=ROOT, check=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest)


def _run(cwd: Path, code: str, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTFT_BACKEND", "TRITON_INTERPRET")}
    env.update(PYTHONPATH=".", **env_extra)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_git_archive_of_head_runs_with_pythonpath_dot(tmp_path):
    built = glob.glob(str(ROOT / "fastft" / "_C*.so"))
    if not built:
        pytest.skip("fastft._C is not built in this checkout (make build)")
    copy = tmp_path / "checkout"
    copy.mkdir()
    _archive_head(copy)
    assert not glob.glob(str(copy / "fastft" / "_C*")), "the archive must not hold a built extension"
    shutil.copy2(built[0], copy / "fastft")

    result = _run(copy, ACCEPTANCE)
    assert result.returncode == 0, result.stderr[-3000:]

    result = _run(copy, TRITON_OP, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton ok (3, 64)" in result.stdout
