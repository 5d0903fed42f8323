"""How serving instances use the EMS pool: the context cache as the engine's KV connector, and
the model cache for warm starts.

A pool that is down or slow only costs hit rate and warm starts: pool errors (:data:`POOL_ERRORS`)
are logged and treated as misses. Any other exception is a bug and propagates.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path

import msgspec
import torch

from matrixinfer.ems.client import EmsClient
from matrixinfer.ems.connection import EmsError
from matrixinfer.ems.context_cache import ContextCache
from matrixinfer.ems.model_cache import ModelCache
from matrixinfer.engine.kv_connector import KVConnector
from matrixinfer.engine.sequence import Sequence
from matrixinfer.model.deepseek import DeepseekForCausalLM

log = logging.getLogger(__name__)

#: what an unreachable, refusing or shrinking pool raises (a miss, not a failure)
POOL_ERRORS = (EmsError, OSError)


class EmsConnector(KVConnector):
    """KV blocks in the EMS context cache: one value per block holding every layer's latents.

    A prefill instance reads and stores prompt blocks (``read=True, store="prompt"``); a decode
    instance that keeps generated KV stores only the blocks past the prompt (``store="generated"``:
    the prompt's blocks are the prefill side's to store).
    """

    def __init__(self, client: EmsClient, block_size: int, namespace: str, read: bool = True,
                 store: str = "prompt") -> None:
        if store not in ("prompt", "generated"):
            raise ValueError(f"store must be 'prompt' or 'generated', got {store!r}")
        self.pool = ContextCache(client, block_size, hash_namespace=namespace)
        self.block_size = block_size
        self.read = read
        self.store = store
        self._lock = threading.Lock()
        self._hits: dict[str, int] = {}  # request -> external blocks found (asked once per request)
        self._stored: dict[str, int] = {}  # request -> leading blocks already in the pool
        self.stored_blocks = 0
        self.loaded_blocks = 0

    def num_external_blocks(self, seq: Sequence, hashes: list[bytes]) -> int:
        if not self.read:
            return 0
        hit = self._hits.get(seq.request_id)
        if hit is None:
            try:
                hit = self.pool.lookup_prefix(hashes)
            except POOL_ERRORS as exc:
                log.warning("EMS lookup failed: %s", exc)
                hit = 0
            self._hits[seq.request_id] = hit
        return min(hit, len(hashes))

    def after_alloc(self, seq: Sequence, hashes: list[bytes], block_ids: list[int]) -> int:
        blocks = [self.cache.block_view(b) for b in block_ids]
        staging = [torch.empty(b.shape, dtype=b.dtype) for b in blocks]
        try:
            n = self.pool.load_blocks(hashes, staging)
        except POOL_ERRORS as exc:
            log.warning("EMS load failed: %s", exc)
            return 0
        for dst, src in zip(blocks[:n], staging[:n]):
            dst.copy_(src)
        self.loaded_blocks += n
        self._stored[seq.request_id] = len(seq.block_table)  # the local and external hits are in the pool already
        return n

    def save(self, seq: Sequence, hashes: list[bytes]) -> None:
        prompt_blocks = len(seq.prompt_ids) // self.block_size
        if self.store == "prompt":
            full = min(len(hashes), prompt_blocks)
            done = self._stored.get(seq.request_id, 0)
        else:
            full = len(hashes)
            done = self._stored.get(seq.request_id, prompt_blocks)
        if full <= done:
            return
        self._stored[seq.request_id] = full
        # copies: the KV blocks may be reused as soon as this returns
        copies = [self.cache.block_view(b).contiguous().cpu().clone() for b in seq.block_table[done:full]]
        try:
            self.pool.store_blocks_async(hashes[done:full], copies).add_done_callback(self._stored_some)
        except POOL_ERRORS as exc:
            log.warning("EMS store failed: %s", exc)

    def _stored_some(self, fut: Future) -> None:
        try:
            n = fut.result()
        except POOL_ERRORS as exc:
            log.warning("EMS store failed: %s", exc)
            return
        with self._lock:
            self.stored_blocks += n

    def request_finished(self, seq: Sequence) -> None:
        self._hits.pop(seq.request_id, None)
        self._stored.pop(seq.request_id, None)

    def stats(self) -> dict[str, int | float]:
        return {"ems_stored_blocks": self.stored_blocks, "ems_loaded_blocks": self.loaded_blocks}


def ems_client(servers: list[str] | None, controller: str, secret: bytes | None) -> EmsClient:
    """The client an instance reaches the pool with: the given servers, else the controller's view."""
    from matrixinfer.ems.membership import ControllerMembership

    kw: dict = dict(namespace="matrixinfer", timeout=2.0, connect_timeout=0.3, secret=secret)
    if servers:
        return EmsClient(servers, **kw)
    return EmsClient(membership=ControllerMembership(controller, secret=secret), **kw)


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
    except (*POOL_ERRORS, msgspec.DecodeError) as exc:
        log.warning("EMS model cache unavailable: %s", exc)
        tensors = None
    return tensors, version


def load_model_via_pool(client: EmsClient, path: Path, model_id: str, dtype: torch.dtype,
                        device: torch.device | str = "cpu") -> tuple[DeepseekForCausalLM | None, str]:
    """The model built from the EMS model cache (``None`` on a miss) and the checkpoint's version.

    On a CPU model the pool's bytes land straight in the parameters (one copy, no staging); other
    tensors (a dtype or layout the model converts) are fetched one by one and converted by the loader.
    """
    from matrixinfer.model.loader import CheckpointError, load_model

    version = checkpoint_version(path)
    cache = ModelCache(client)
    try:
        manifest = cache.manifest(model_id, version)
    except (*POOL_ERRORS, msgspec.DecodeError) as exc:
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
        except POOL_ERRORS as exc:  # the loader then asks for every tensor through the mapping
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

    def __iter__(self) -> Iterator[str]:
        return iter(self.metas)

    def __len__(self) -> int:
        return len(self.metas)


def publish_tensors(client: EmsClient, path: Path, model_id: str, version: str) -> int:
    """Put the checkpoint's tensors in the pool so the next instance starts warm; bytes written."""
    from matrixinfer.model.loader import read_checkpoint_tensors

    try:
        return ModelCache(client).prefetch(model_id, version, lambda: read_checkpoint_tensors(path))
    except (*POOL_ERRORS, ValueError) as exc:  # ValueError: the model does not fit the pool
        log.warning("could not publish %s to the EMS model cache: %s", model_id, exc)
        return 0
