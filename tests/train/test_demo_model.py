"""Acceptance bar of the shipped demo model (issue 7): standard format, quality, MTP, balance."""

from __future__ import annotations

import json

import pytest
import torch

from matrixinfer.model.attention import AttentionMetadata
from matrixinfer.train.metrics import evaluate

MAX_BYTES = 25_000_000


def test_checkpoint_files_and_size(demo_dir):
    names = {p.name for p in demo_dir.iterdir()}
    for required in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json", "CORPUS.md"):
        assert required in names, f"{demo_dir} lacks {required}"
    assert sum(p.stat().st_size for p in demo_dir.iterdir()) <= MAX_BYTES
    cfg = json.loads((demo_dir / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert cfg["n_routed_experts"] >= 16 and cfg["n_shared_experts"] >= 1
    assert cfg["first_k_dense_replace"] == 1 and cfg["num_nextn_predict_layers"] == 1
    assert cfg["q_lora_rank"] and cfg["kv_lora_rank"]
    corpus_md = " ".join((demo_dir / "CORPUS.md").read_text().split())
    assert "Python Software Foundation" in corpus_md and "sha256" in corpus_md


def test_tokenizer_and_chat_template(demo_dir):
    from matrixinfer.model.tokenizer import Tokenizer

    tok = Tokenizer(demo_dir)
    assert 1000 <= tok.vocab_size <= 8192
    ids = tok.encode("def fibonacci(n):\n    return n\n")
    assert ids[0] == tok.bos_token_id and tok.decode(ids) == "def fibonacci(n):\n    return n\n"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt.startswith("<|bos|>") and "<|user|>hi" in prompt and prompt.endswith("<|assistant|>")
    user = tok._tok.token_to_id("<|user|>")
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[:2] == [tok.bos_token_id, user]


def test_transformers_logits_match_ours(demo_dir, demo_model, heldout_sample):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    ids = heldout_sample.windows[:2, :128]
    with torch.no_grad():
        expect = ref(ids).logits
        hidden = demo_model(ids.reshape(-1), torch.arange(128).repeat(2), AttentionMetadata.build([128, 128]))
        got = demo_model.compute_logits(hidden).view_as(expect)
    assert (got - expect).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def report(demo_model, heldout_sample):
    return evaluate(demo_model, heldout_sample.windows)


def test_heldout_perplexity_at_most_half_of_bigram(report, heldout_sample):
    assert report.perplexity <= 0.5 * heldout_sample.bigram_perplexity, (
        f"perplexity {report.perplexity:.2f} vs bigram {heldout_sample.bigram_perplexity:.2f}")


def test_mtp_draft_acceptance(report):
    assert report.mtp_acceptance >= 0.5


def test_no_dead_experts(report):
    for gate, fractions in report.expert_fractions.items():
        assert min(fractions) >= 0.01, f"{gate}: expert loads {[round(f, 4) for f in fractions]}"
