"""Every Triton kernel compiles ahead of time for sm_90 (H100) and sm_80 (A100), on a machine without a GPU.

Runs in a subprocess: compilation needs triton imported without TRITON_INTERPRET, which the
interpreter tests of test_kernels.py set for this process. A fresh cache dir makes it compile
for real instead of loading a cached binary.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

AOT_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "aot_compile.py"  # no runtime path imports it


@pytest.mark.timeout(300)
def test_every_kernel_compiles_for_sm90_and_sm80(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, str(AOT_SCRIPT), "--capability", "90", "80"],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
        start_new_session=True,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ok ", "FAIL"))]
    for capability in (90, 80):
        names = [line.split()[2] for line in lines if f" sm_{capability} " in line]
        assert {"sum_partials", "dots[bf16-bf16]", "combine[bf16-bf16]"} <= set(names), output[-3000:]
        assert any(name.startswith("blur_adamw[") for name in names), output[-3000:]
    # The aligned variants must use 16-byte vector accesses: without them the kernels run at a
    # fraction of the bandwidth, and nothing else in CI would notice.
    for line in lines:
        accesses = int(re.search(r"16-byte accesses: (\d+)", line).group(1))
        if "unaligned" not in line and "sum_partials" not in line:
            assert accesses > 0, f"no 16-byte accesses: {line}"
