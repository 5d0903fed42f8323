"""How serving instances use the EMS pool: the context cache behind the engine's
:class:`ExternalPrefixCache` interface, and the model cache for warm starts."""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import torch

from matrixinfer.engine.external_cache import ExternalPrefixCache
from matrixinfer.ems.client import EmsClient
from matrixinfer.ems.context_cache import ContextCache
from matrixinfer.ems.model_cache import ModelCache

log = logging.getLogger(__name__)


class EmsPrefixCache(ExternalPrefixCache):
    """KV blocks in EMS: one value per block holding every layer's latents (contiguous)."""

    def __init__(self, client: EmsClient, block_size: int, namespace: str) -> None:
        self.cache = ContextCache(client, block_size, hash_namespace=namespace)
        self.lock = threading.Lock()
        self.stored_blocks = 0
        self.loaded_blocks = 0

    def lookup(self, hashes: list[bytes]) -> int:
        try:
            return self.cache.lookup_prefix(hashes)
        except Exception as exc:  # a dead pool only lowers the hit rate
            log.warning("EMS lookup failed: %s", exc)
            return 0

    def load(self, hashes: list[bytes], blocks: list[torch.Tensor]) -> int:
        staging = [torch.empty(b.shape, dtype=b.dtype) for b in blocks]
        try:
            n = self.cache.load_blocks(hashes, staging)
        except Exception as exc:
            log.warning("EMS load failed: %s", exc)
            return 0
        for dst, src in zip(blocks[:n], staging[:n]):
            dst.copy_(src)
        self.loaded_blocks += n
        return n

    def store_async(self, hashes: list[bytes], blocks: list[torch.Tensor]) -> None:
        copies = [b.contiguous().cpu().clone() for b in blocks]  # the KV blocks may be reused at once

        def done(fut) -> None:
            try:
                with self.lock:
                    self.stored_blocks += fut.result()
            except Exception as exc:
                log.warning("EMS store failed: %s", exc)

        try:
            self.cache.store_blocks_async(hashes, copies).add_done_callback(done)
        except Exception as exc:
            log.warning("EMS store failed: %s", exc)


def checkpoint_version(path: Path) -> str:
    """A version id that changes whenever the checkpoint's files change (names, sizes, mtimes)."""
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".json")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def load_tensors_via_pool(client: EmsClient, path: Path, model_id: str) -> tuple[dict | None, str]:
    """The checkpoint's tensors from the EMS model cache (``None`` on a miss) and its version."""
    version = checkpoint_version(path)
    try:
        tensors = ModelCache(client).load(model_id, version)
    except Exception as exc:
        log.warning("EMS model cache unavailable: %s", exc)
        tensors = None
    return tensors, version


def publish_tensors(client: EmsClient, path: Path, model_id: str, version: str) -> int:
    """Put the checkpoint's tensors in the pool so the next instance starts warm; bytes written."""
    from matrixinfer.model.loader import read_checkpoint_tensors

    try:
        return ModelCache(client).prefetch(model_id, version, lambda: read_checkpoint_tensors(path))
    except Exception as exc:
        log.warning("could not publish %s to the EMS model cache: %s", model_id, exc)
        return 0
