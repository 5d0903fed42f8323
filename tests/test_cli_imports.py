"""The ``matrixinfer`` command's parser loads no heavy library: every process a deployment starts
(EMS servers, the router, the API server, each engine) goes through it, and torch alone took 1-3 s
of a core per process on 2 busy cores (``python -X importtime``), paid by every server start."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO, python_env


def test_the_parser_imports_no_torch_numpy_or_transformers():
    code = ("import sys\nfrom matrixinfer.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=python_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
