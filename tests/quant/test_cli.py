"""``matrixinfer quantize`` end to end: a tiny checkpoint in, an INT8 checkpoint out, served
unchanged through the OpenAI API, its output what the INT8 model computes and close to the original."""

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch

from matrixinfer.cli import main
from matrixinfer.model.default_model import write_byte_tokenizer
from matrixinfer.model.generate import generate
from matrixinfer.model.loader import load_model
from tests.checkpoints import make_checkpoint
from tests.quant.conftest import logits
from tests.serve.helpers import API_KEY, Server, stream_tokens

PROMPTS = [[256, *b"def f(x):\n    return"], [256, *b"import os\nclass A:"]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny V3 checkpoint with a byte tokenizer, and its INT8 checkpoint written by the CLI."""
    root = tmp_path_factory.mktemp("quantize")
    src = make_checkpoint(root / "src", "v3", seed=9, vocab_size=264, bos_token_id=256, eos_token_id=257)
    write_byte_tokenizer(src)
    text = root / "calibration.py"
    text.write_text(Path(json.__file__).read_text() + Path(httpx.__file__).read_text())
    out = root / "int8"
    assert main(["quantize", "--model", str(src), "--out", str(out), "--calibration", str(text),
                 "--windows", "8", "--seq-len", "64"]) == 0
    return src, out


def test_cli_writes_a_checkpoint_with_tokenizer_and_report(checkpoints, capsys):
    src, out = checkpoints
    assert {p.name for p in src.iterdir()} <= {p.name for p in out.iterdir()}
    details = json.loads((out / "config.json").read_text())["quantization_config"]["matrixinfer"]
    assert details["steps"]["smooth"] and len(details["blocks"]) == 3


def test_cli_errors_name_the_problem(checkpoints, tmp_path, capsys):
    src, _ = checkpoints
    assert main(["quantize", "--model", str(src), "--out", str(tmp_path / "o"),
                 "--calibration", str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt: cannot read calibration text" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--calibration",
                 str(Path(json.__file__))]) == 1
    assert "tokenizer.json" in capsys.readouterr().err


def test_int8_checkpoint_is_served_unchanged(checkpoints):
    src, out = checkpoints
    int8 = load_model(out, progress=False)
    expected = generate(int8, PROMPTS, 12)
    server = Server(out, "--kv-cache-memory", str(8 << 20), api_key=API_KEY)
    try:
        async def served() -> list[list[int]]:
            async with httpx.AsyncClient(timeout=60) as client:
                body = {"model": "tiny", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
                return [(await stream_tokens(client, server.url, {**body, "prompt": p}))[0] for p in PROMPTS]
        got = asyncio.run(served())
    finally:
        server.stop()
    assert got == expected
    # Close to the original: the float model's next-token choices along the served continuations.
    # (Measured: 13% and 21% logit error, 100% and 94% argmax agreement; a random tiny V3 model's
    # routing flips on small perturbations, and broken scales would give ~100% and ~0.4%.)
    original = load_model(src, progress=False)
    for prompt, cont in zip(PROMPTS, got):
        w = torch.tensor([prompt + cont])
        ref, q = logits(original, w), logits(int8, w)
        assert (q - ref).norm() / ref.norm() < 0.3
        assert (q.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.85
