"""The decode instance's KV port bounds what a chunk header may announce (issue 19, medium 6): a header
that does not describe KV of this cache closes the connection before anything is allocated, and a
real chunk is still written into its reservation."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import msgspec
import pytest
import torch

from matrixinfer.model.attention import PagedLatentCache
from matrixinfer.netio import FRAMING, connect
from matrixinfer.serve import messages as m
from matrixinfer.serve.kv_transfer import KVReceiver

LAYERS, DIM, MAX_SEQ = 3, 16, 64


def _receiver() -> tuple[KVReceiver, list]:
    written: list = []
    engine = SimpleNamespace(runner=SimpleNamespace(kv_cache=PagedLatentCache(LAYERS, 8, 8, DIM)), max_seq_len=MAX_SEQ,
                             has_reservation=lambda rid: True,
                             write_reserved=lambda rid, start, kv: written.append((rid, start, kv.clone())) or True)
    return KVReceiver(engine, "127.0.0.1", lambda done: None, threading.Event()), written  # type: ignore[arg-type]


def _closed(sock, within: float = 3.0) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("chunk", [
    m.KVChunk("r", 0, 2, 10, DIM, "float32", 256 << 20),  # nbytes beyond its own shape
    m.KVChunk("r", 0, 2, 1 << 40, DIM, "float32", 2 * (1 << 40) * DIM * 4),  # more tokens than a sequence
    m.KVChunk("r", 0, 99, 10, DIM, "float32", 99 * 10 * DIM * 4),  # layers the cache does not have
    m.KVChunk("r", 0, 2, 10, 4096, "float32", 2 * 10 * 4096 * 4),  # another latent width
    m.KVChunk("r", 0, 2, 10, DIM, "manual_seed", 2 * 10 * DIM),  # not a dtype
    m.KVChunk("r", 2, 1, 10, DIM, "float32", 0),  # an empty or reversed layer range
])
def test_a_chunk_header_that_is_not_kv_for_this_cache_closes_the_connection(chunk):
    receiver, written = _receiver()
    sock = connect(receiver.addr, timeout=5)
    FRAMING.send(sock, chunk)
    assert _closed(sock)
    assert written == []


def test_a_real_chunk_is_written_and_acknowledged():
    receiver, written = _receiver()
    sock = connect(receiver.addr, timeout=5)
    kv = torch.randn(2, 10, DIM)
    FRAMING.send(sock, m.KVChunk("r", 1, 3, 10, DIM, "float32", kv.numel() * 4), [kv.numpy().data])
    FRAMING.send(sock, m.KVDone("r", 7, None, 0))
    ack = FRAMING.recv(sock, msgspec.msgpack.Decoder(m.Reserved))
    assert ack.ok and written[0][0] == "r" and written[0][1] == 1 and torch.equal(written[0][2], kv)
