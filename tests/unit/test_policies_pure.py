"""policies/ is the pure core: importing it pulls in no Ray, Redis, vLLM or HTTP stack."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import policies

FORBIDDEN = ("ray", "redis", "vllm", "starlette", "fastapi", "httpx", "aiohttp", "torch")


def test_importing_every_policy_module_loads_no_io_stack():
    modules = [f"policies.{m.name}" for m in pkgutil.iter_modules(policies.__path__)]
    assert modules, "policies/ has no modules"
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(policies.__path__[0]).parent)
    assert out.stdout.strip() == ""
