"""``matrixinfer generate`` on a checkpoint and on the built-in default model."""

from __future__ import annotations

import subprocess
import sys


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "matrixinfer.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_generate_default_model(tmp_path):
    import os

    env = dict(os.environ, MATRIXINFER_HOME=str(tmp_path))
    out = _run("generate", "--device", "cpu", "--max-tokens", "8", "def f(x):", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def f(x):")
    again = _run("generate", "--device", "cpu", "--max-tokens", "8", "def f(x):", env=env)
    assert again.stdout == out.stdout  # greedy and deterministic


def test_generate_reports_bad_checkpoint(tmp_path):
    out = _run("generate", "--model", str(tmp_path), "hello")
    assert out.returncode != 0
    assert "tokenizer.json" in out.stderr or "config.json" in out.stderr
