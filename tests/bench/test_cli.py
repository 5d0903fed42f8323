"""``matrixinfer bench`` end to end against the fake server: table, JSON, API key, exit codes."""

from __future__ import annotations

import json

from matrixinfer.cli import main
from tests.bench.fake_server import FakeServer

COMMON = ["--num-prompts", "6", "--output-len", "3", "--disable-tqdm", "--seed", "2"]


def test_random_dataset_run_writes_table_and_json(tmp_path, capsys) -> None:
    out = tmp_path / "res" / "bench.json"
    with FakeServer(ttft_s=0.02, itl_s=0.005, vocab_size=40, api_key="k") as server:
        argv = ["bench", "--base-url", server.base_url, "--api-key", "k", "--input-len", "4:8"]
        code = main(argv + COMMON + ["--slo-ttft-ms", "5000", "--result-json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "Successful requests:" in table and "Mean TTFT (ms):" in table and "P99 TPOT (ms):" in table
    doc = json.loads(out.read_text())
    assert doc["summary"]["completed"] == 6 and doc["summary"]["total_output_tokens"] == 18
    assert doc["summary"]["goodput"] > 0 and doc["config"]["model"] == "fake-model"
    assert doc["config"]["vocab_size"] == 40 and "api_key" not in doc["config"]
    assert len(doc["requests"]) == 6 and all(r["success"] for r in doc["requests"])
    assert all(10 <= t < 40 for b in server.bodies for t in b["prompt"])  # ids from the served vocab


def test_shared_prefix_run_sends_grouped_prompts(capsys) -> None:
    with FakeServer(ttft_s=0.01, itl_s=0.005) as server:
        argv = ["bench", "--base-url", server.base_url, "--dataset", "shared-prefix", "--num-groups", "2"]
        code = main(argv + ["--prefix-len", "12", "--suffix-len", "3", "--max-concurrency", "2"] + COMMON)
    assert code == 0
    prompts = [b["prompt"] for b in server.bodies]
    assert all(len(p) == 15 for p in prompts) and len({tuple(p[:12]) for p in prompts}) == 2


def test_wrong_api_key_is_reported(capsys) -> None:
    with FakeServer(api_key="right") as server:
        assert main(["bench", "--base-url", server.base_url, "--api-key", "wrong"] + COMMON) == 2
        assert "cannot find the model id" in capsys.readouterr().err
        assert main(["bench", "--base-url", server.base_url, "--model", "m", "--api-key", "wrong"] + COMMON) == 1
    out = capsys.readouterr().out
    assert "Failed requests:" in out and "HTTP 401: invalid API key" in out
