"""How the package is found: from the repository root, editable, and from an installed wheel.

The top-level `kernels/` folder holds the Triton kernels and is imported as `blur_lightning.kernels`.
transformers >= 5 imports the PyPI package `kernels` while it loads model classes; a regular package
named `kernels` at the repository root would shadow it for every process started there (`python -m`,
`python -c`, torchrun, a notebook), and did on 2026-12-04. These tests start such processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter: transformers' Llama first (it imports PyPI's `kernels`), then ours,
# then one kernel under the Triton interpreter against float64.
PROBE = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from transformers import LlamaForCausalLM  # noqa: F401  (imports PyPI's `kernels` on transformers >= 5)
    try:  # transformers < 5.x did not depend on it: then only the namespace portion (or nothing) is found
        import kernels
    except ModuleNotFoundError:
        print("kernels: not installed")
    else:
        where = getattr(kernels, "__file__", None) or list(getattr(kernels, "__path__", []))
        print("kernels from", where)
        assert getattr(kernels, "__file__", None) is None or "site-packages" in kernels.__file__, where

    import blur_lightning.kernels as bk
    print("blur_lightning.kernels path", bk.__path__)
    g = torch.Generator().manual_seed(0)
    forget = [torch.randn(n, generator=g) for n in (1, 127, 1000)]
    retain = [torch.randn(n, generator=g) for n in (1, 127, 1000)]
    got = bk.multi_tensor_dots(forget, retain)
    f64 = [t.double() for t in forget], [t.double() for t in retain]
    want = torch.stack([
        sum((r * f).sum() for f, r in zip(*f64)),
        sum((f * f).sum() for f in f64[0]),
        sum((r * r).sum() for r in f64[1]),
    ])
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6), (got, want)
    print("dots ok", got.tolist())
    """
)


def _run(code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


def test_repository_root_does_not_shadow_pypi_kernels():
    """`python -c` in the repository root puts the root first on sys.path: the case that broke."""
    done = _run(PROBE, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dots ok" in done.stdout
    assert str(REPO / "kernels" / "__init__.py") not in done.stdout


def test_kernel_folder_is_a_namespace_portion():
    """A regular package there is exactly the defect: the path finder returns the first one it meets."""
    assert not (REPO / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the top-level folder a regular package that shadows PyPI's `kernels`; "
        "blur_lightning/kernels.py is its __init__"
    )


@pytest.mark.slow
def test_installed_wheel_imports_kernels(tmp_path):
    """A wheel (what `pip install blur-lightning` gives) ships kernels/ as blur_lightning/kernels/."""
    pytest.importorskip("setuptools")
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO), "-w", str(wheels)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("blur_lightning-*.whl")
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    assert (target / "blur_lightning" / "kernels" / "dots.py").is_file()
    # every subpackage of the source tree ships (pyproject lists them by name: a new one is easy to miss)
    source = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "blur_lightning").rglob("__init__.py")}
    shipped = {p.parent.relative_to(target).as_posix() for p in (target / "blur_lightning").rglob("__init__.py")}
    assert source == shipped, f"missing from the wheel: {sorted(source - shipped)}"
    assert not (target / "kernels").exists(), "the wheel must not install a top-level `kernels`"
    # run outside the checkout, with the wheel's copy first on the path
    done = _run(PROBE, cwd=tmp_path, env={"PYTHONPATH": str(target)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert str(target / "blur_lightning" / "kernels") in done.stdout
