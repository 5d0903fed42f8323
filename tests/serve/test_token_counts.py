"""Issue 18 (defect 8): clients that count tokens with the Hugging Face tokenizer agree with
``usage``. The shipped tokenizer.json had no post-processor, so transformers added no BOS while the
server did: every count was off by one."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from matrixinfer.model.default_model import SHIPPED, write_byte_tokenizer
from matrixinfer.model.tokenizer import Tokenizer

TEXTS = ["hello", "def f(x):\n    return x + 1", "  spaces  and ünïcode ✓"]


@pytest.mark.parametrize("which", ["shipped", "byte"])
def test_hugging_face_counts_the_server_tokens(which, tmp_path):
    path = SHIPPED if which == "shipped" else tmp_path
    if which == "byte":
        write_byte_tokenizer(tmp_path)
    ours, hf = Tokenizer(path), AutoTokenizer.from_pretrained(str(path))
    for text in TEXTS:
        assert hf(text).input_ids == ours.encode(text)
        assert hf(text, add_special_tokens=False).input_ids == ours.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "hi"}]
    got = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(got["input_ids"]) == ours.encode_chat(messages)
