"""How serving instances use the EMS pool: the context cache behind the engine's
:class:`ExternalPrefixCache` interface, and the model cache for warm starts."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from matrixinfer.ems.client import EmsClient
from matrixinfer.ems.context_cache import ContextCache
from matrixinfer.ems.model_cache import ModelCache
from matrixinfer.engine.external_cache import ExternalPrefixCache

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


def load_model_via_pool(client: EmsClient, path: Path, model_id: str, dtype: torch.dtype,
                        device: torch.device | str = "cpu") -> tuple[torch.nn.Module | None, str]:
    """The model built from the EMS model cache (``None`` on a miss) and the checkpoint's version.

    On a CPU model the pool's bytes land straight in the parameters (one copy, no staging); other
    tensors (a dtype or layout the model converts) are fetched one by one and converted by the loader.
    """
    from matrixinfer.model.loader import CheckpointError, load_model

    version = checkpoint_version(path)
    cache = ModelCache(client)
    try:
        manifest = cache.manifest(model_id, version)
    except Exception as exc:
        log.warning("EMS model cache unavailable: %s", exc)
        return None, version
    if manifest is None:
        return None, version
    metas = {t.name: t for t in manifest.tensors}

    source = _PoolTensors(cache, model_id, version, metas)

    def fill(dests: dict[str, torch.Tensor]) -> set[str]:
        outs = {n: d.view(-1).view(torch.uint8).numpy() for n, d in dests.items()
                if n in metas and metas[n].dtype == str(d.dtype) and metas[n].shape == list(d.shape)}
        try:
            done = cache.load_into(model_id, version, outs)
            source.prefetch([n for n in metas if n not in done])  # the loader converts these
        except Exception as exc:  # the loader then asks for every tensor through the mapping
            log.warning("EMS model cache: in-place load failed: %s", exc)
            return set()
        return done

    if torch.device(device).type != "cpu":  # no in-place fill: stage every tensor, in one batch
        source.prefetch(list(metas))
    try:
        model = load_model(path, dtype=dtype, device=device, progress=False, tensors=source, fill_in_place=fill)
    except CheckpointError as exc:  # e.g. a tensor left the pool while loading: start cold instead
        log.warning("EMS model cache: %s", exc)
        return None, version
    return model, version


class _PoolTensors(Mapping):
    """The manifest's tensors, each fetched when the loader asks for it (only those it could not
    fill in place)."""

    def __init__(self, cache: ModelCache, model_id: str, version: str, metas: dict) -> None:
        self.cache, self.model_id, self.version, self.metas = cache, model_id, version, metas
        self.fetched: dict[str, object] = {}

    def prefetch(self, names: list[str]) -> None:
        """Fetch these tensors in one batch (a round trip per tensor adds up over thousands of experts)."""
        self.fetched.update(self.cache.load_some(self.model_id, self.version, [self.metas[n] for n in names]))

    def __getitem__(self, name: str) -> object:
        tensor = self.fetched.pop(name, None)
        if tensor is None:
            tensor = self.cache.load_some(self.model_id, self.version, [self.metas[name]]).get(name)
        if tensor is None:
            raise KeyError(f"tensor {name} of {self.model_id}@{self.version} is no longer in the pool")
        return tensor

    def __iter__(self):
        return iter(self.metas)

    def __len__(self) -> int:
        return len(self.metas)


def publish_tensors(client: EmsClient, path: Path, model_id: str, version: str) -> int:
    """Put the checkpoint's tensors in the pool so the next instance starts warm; bytes written."""
    from matrixinfer.model.loader import read_checkpoint_tensors

    try:
        return ModelCache(client).prefetch(model_id, version, lambda: read_checkpoint_tensors(path))
    except Exception as exc:
        log.warning("could not publish %s to the EMS model cache: %s", model_id, exc)
        return 0
