"""The training machinery on a tiny model: learning, expert balancing, deterministic resume."""

from __future__ import annotations

import torch

from matrixinfer.config import ModelConfig
from matrixinfer.model.moe import Gate
from matrixinfer.train import corpus
from matrixinfer.train.balance import update_bias
from matrixinfer.train.loop import build_model, lr_at, train
from matrixinfer.train.metrics import BigramModel
from matrixinfer.train.recipe import TrainConfig, model_config

TINY = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
            q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


def _tiny() -> ModelConfig:
    cfg = model_config(vocab_size=64, bos_token_id=0, eos_token_id=1)
    cfg.update(TINY)
    return ModelConfig.from_dict(cfg)


def _stream() -> torch.Tensor:
    # A learnable sequence: a repeating pattern with a little noise.
    g = torch.Generator().manual_seed(0)
    base = torch.arange(4000) % 17 + 2
    noise = torch.randint(2, 64, (4000,), generator=g)
    return torch.where(torch.rand(4000, generator=g) < 0.1, noise, base).int()


def _tc(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(seq_len=32, batch_size=4, steps=6, warmup_steps=2, checkpoint_every=3,
                                 lr=3e-3, bias_update_speed=1e-2), **kw})


def test_resume_reproduces_uninterrupted_run(tmp_path):
    straight = train(build_model(_tiny(), 0), _stream(), _tc(), tmp_path / "a", torch.device("cpu"), log=lambda s: None)
    train(build_model(_tiny(), 0), _stream(), _tc(), tmp_path / "b", torch.device("cpu"), log=lambda s: None,
          stop_at=3)
    # A differently initialised model picks up the interrupted run's weights, optimizer and data order.
    resumed = train(build_model(_tiny(), 1), _stream(), _tc(), tmp_path / "b", torch.device("cpu"), log=lambda s: None)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_training_lowers_loss_and_moves_router_bias(tmp_path):
    from matrixinfer.train.metrics import evaluate, sample_windows

    stream = _stream()
    windows = sample_windows(stream, 33, 8)
    before = evaluate(build_model(_tiny(), 0), windows).perplexity
    model = train(build_model(_tiny(), 0), stream, _tc(steps=40, lr=1e-2), tmp_path, torch.device("cpu"),
                  log=lambda s: None)
    assert evaluate(model, windows).perplexity < 0.5 * before
    biases = [m.e_score_correction_bias for m in model.modules() if isinstance(m, Gate)]
    assert len(biases) == 2 and all(b.abs().sum() > 0 for b in biases)  # one MoE layer plus the MTP block


def test_bias_update_favours_underloaded_experts():
    gate = Gate(_tiny())
    update_bias([gate], [torch.tensor([10, 0, 5, 5] + [5] * 12)], gamma=0.1)
    bias = gate.e_score_correction_bias
    assert bias[0] < 0 < bias[1] and bias[2] == 0


def test_lr_schedule_warms_up_then_decays():
    tc = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, tc) == 0.1 and lr_at(9, tc) == 1.0
    assert lr_at(55, tc) < lr_at(10, tc) and abs(lr_at(100, tc) - 0.1) < 1e-9


def test_split_is_by_path_hash_and_disjoint():
    files = [corpus.SourceFile(f"pkg/mod{i}.py", "x = 1\n") for i in range(400)]
    train_files, heldout = corpus.split(files, 5)
    assert 5 <= len(heldout) <= 40 and len(train_files) + len(heldout) == 400
    assert all(corpus.is_heldout(f.path, 5) for f in heldout)
    # A file's side does not depend on the other files.
    assert [f.path for f in corpus.split(files[:200], 5)[1]] == [f.path for f in heldout if f in files[:200]]


def test_bigram_prefers_seen_continuations():
    stream = torch.tensor([2, 3, 2, 3, 2, 3, 2, 4])
    bigram = BigramModel(stream, 8)
    nll = bigram.nll(torch.tensor([2, 2]), torch.tensor([3, 5]), alpha=1.0)
    assert nll[0] < nll[1]


def test_train_demo_command_is_registered():
    from matrixinfer.cli import build_parser

    args = build_parser().parse_args(["train-demo", "--steps", "5", "--device", "cpu"])
    assert args.steps == 5 and args.func.__name__ == "_train_demo"
