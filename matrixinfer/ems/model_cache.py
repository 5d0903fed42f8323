"""Model cache: weights in the pool keyed by (model id, version, tensor), with model-level LRU.

Each version has a manifest (tensor names, dtypes, shapes) and one pool entry per tensor, all under
``model/<id>@<version>/``; a different version is a different set of keys, so it can never serve
another version's tensors. A registry entry records each cached model's size and last use; when a
prefetch would exceed ``capacity`` the least recently used *whole model* is removed. The registry
is read-modify-write: one process (e.g. the instance manager) should prefetch at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import msgspec
import numpy as np

from matrixinfer.ems.client import EmsClient
from matrixinfer.ems.connection import writable_view

REGISTRY_KEY = b"model/__registry__"


class TensorMeta(msgspec.Struct):
    """How to rebuild one tensor from its bytes."""

    name: str
    dtype: str  # numpy dtype string ("<f4") or a torch dtype ("torch.bfloat16")
    shape: list[int]
    nbytes: int


class Manifest(msgspec.Struct):
    """The tensors of one model version."""

    model_id: str
    version: str
    tensors: list[TensorMeta]


class RegistryEntry(msgspec.Struct):
    """One cached model version in the LRU registry."""

    nbytes: int
    last_used: float


def _ref(model_id: str, version: str) -> str:
    if "@" in model_id or "/" in version:
        raise ValueError(f"model id {model_id!r} may not contain '@' and version {version!r} may not contain '/'")
    return f"{model_id}@{version}"


def _to_bytes(tensor: object) -> tuple[str, list[int], np.ndarray]:
    if type(tensor).__module__.startswith("torch"):  # torch is imported only when given its tensors
        import torch

        if isinstance(tensor, torch.Tensor):
            t = tensor.detach().contiguous().cpu()
            return str(t.dtype), list(t.shape), t.view(torch.uint8).reshape(-1).numpy()
    arr = np.ascontiguousarray(tensor)
    return arr.dtype.str, list(arr.shape), arr.reshape(-1).view(np.uint8)


def _from_bytes(meta: TensorMeta, raw: bytearray) -> object:
    if meta.dtype.startswith("torch."):
        import torch

        dtype = getattr(torch, meta.dtype.removeprefix("torch."))
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(meta.shape)
    return np.frombuffer(raw, dtype=np.dtype(meta.dtype)).reshape(meta.shape)


class ModelCache:
    """Check, prefetch and load model weights through an :class:`EmsClient`."""

    def __init__(self, client: EmsClient, capacity: int | None = None) -> None:
        self.client = client
        self.capacity = capacity

    @staticmethod
    def _tensor_key(model_id: str, version: str, name: str) -> bytes:
        return f"model/{_ref(model_id, version)}/t/{name}".encode()

    @staticmethod
    def _manifest_key(model_id: str, version: str) -> bytes:
        return f"model/{_ref(model_id, version)}/manifest".encode()

    def manifest(self, model_id: str, version: str) -> Manifest | None:
        """The cached manifest of a version, or None."""
        raw = self.client.get(self._manifest_key(model_id, version))
        return None if raw is None else msgspec.json.decode(raw, type=Manifest)

    def check(self, model_id: str, version: str) -> bool:
        """Whether every tensor of this version is in the pool."""
        m = self.manifest(model_id, version)
        return m is not None and all(self.client.mexists([self._tensor_key(model_id, version, t.name)
                                                          for t in m.tensors]))

    def prefetch(self, model_id: str, version: str,
                 source: Mapping[str, object] | Callable[[], Mapping[str, object]]) -> int:
        """Put the tensors of this version that the pool lacks; returns bytes written.

        ``source`` maps tensor names to numpy arrays or CPU tensors, or is a callable returning such
        a mapping (called only when something is missing, e.g. a checkpoint or object-store reader).
        """
        if self.check(model_id, version):
            self._touch(model_id, version, None)
            return 0
        tensors = source() if callable(source) else source
        metas, items, total = [], [], 0
        for name, tensor in tensors.items():
            dtype, shape, raw = _to_bytes(tensor)
            metas.append(TensorMeta(name, dtype, shape, raw.nbytes))
            items.append((name, raw))
            total += raw.nbytes
        self._make_room(model_id, version, total)
        keys = [self._tensor_key(model_id, version, n) for n, _ in items]
        present = self.client.mexists(keys)
        todo = [(k, raw) for k, (_, raw), p in zip(keys, items, present) if not p]
        self.client.mput(todo)
        manifest = Manifest(model_id, version, metas)
        self.client.put(self._manifest_key(model_id, version), msgspec.json.encode(manifest))
        self._touch(model_id, version, total)
        return sum(raw.nbytes for _, raw in todo)

    def load(self, model_id: str, version: str) -> dict[str, object] | None:
        """All tensors of this version (numpy arrays or torch tensors), or None if any is missing."""
        m = self.manifest(model_id, version)
        if m is None:
            return None
        raws = self.client.mget([self._tensor_key(model_id, version, t.name) for t in m.tensors])
        tensors: dict[str, object] = {}
        for t, r in zip(m.tensors, raws):
            if r is None or len(r) != t.nbytes:
                return None
            tensors[t.name] = _from_bytes(t, r)
        self._touch(model_id, version, None)
        return tensors

    def load_some(self, model_id: str, version: str, metas: list[TensorMeta]) -> dict[str, object]:
        """Some tensors of this version (as ``load`` returns them), in one batch; misses are left out."""
        raws = self.client.mget([self._tensor_key(model_id, version, t.name) for t in metas]) if metas else []
        return {t.name: _from_bytes(t, r) for t, r in zip(metas, raws) if r is not None and len(r) == t.nbytes}

    def load_into(self, model_id: str, version: str, outs: Mapping[str, object]) -> set[str]:
        """Write tensors of this version straight into caller buffers (e.g. a model's parameters),
        one copy from the pool and no staging; returns the names written in full. The caller
        matches each buffer to the manifest's dtype and shape; a miss leaves its buffer as it was
        (unless the tensor left the pool while it was being copied: see ``EmsClient.get_into``)."""
        names = [n for n, o in outs.items() if o is not None]
        bufs = [outs[n] for n in names]
        got = self.client.mget([self._tensor_key(model_id, version, n) for n in names], bufs)
        self._touch(model_id, version, None)
        return {n for n, g, b in zip(names, got, bufs) if g is not None and g == writable_view(b).nbytes}

    def evict(self, model_id: str, version: str) -> None:
        """Remove every tensor of this version and its registry entry."""
        m = self.manifest(model_id, version)
        keys = [self._manifest_key(model_id, version)]
        if m is not None:
            keys += [self._tensor_key(model_id, version, t.name) for t in m.tensors]
        self.client.mdelete(keys)
        reg = self.registry()
        if reg.pop(_ref(model_id, version), None) is not None:
            self._save_registry(reg)

    # -- model-granularity LRU -------------------------------------------------------------------
    def registry(self) -> dict[str, RegistryEntry]:
        """Cached model versions (``"id@version"``) with size and last use."""
        raw = self.client.get(REGISTRY_KEY)
        return {} if raw is None else msgspec.json.decode(raw, type=dict[str, RegistryEntry])

    def lru_order(self) -> list[str]:
        """Cached model versions from least to most recently used."""
        return [ref for ref, _ in sorted(self.registry().items(), key=lambda kv: kv[1].last_used)]

    def _save_registry(self, reg: dict[str, RegistryEntry]) -> None:
        self.client.put(REGISTRY_KEY, msgspec.json.encode(reg))

    def _touch(self, model_id: str, version: str, nbytes: int | None) -> None:
        reg = self.registry()
        ref = _ref(model_id, version)
        old = reg.get(ref)
        size = nbytes if nbytes is not None else (old.nbytes if old else 0)
        reg[ref] = RegistryEntry(size, max(time.time(), max((e.last_used for e in reg.values()), default=0) + 1e-6))
        self._save_registry(reg)

    def _make_room(self, model_id: str, version: str, nbytes: int) -> None:
        if self.capacity is None:
            return
        if nbytes > self.capacity:
            raise ValueError(f"model {_ref(model_id, version)} needs {nbytes} bytes, cache capacity is {self.capacity}")
        me = _ref(model_id, version)
        reg = self.registry()
        used = sum(e.nbytes for ref, e in reg.items() if ref != me)
        for ref in self.lru_order():
            if used + nbytes <= self.capacity:
                break
            if ref == me:
                continue
            mid, _, ver = ref.rpartition("@")
            self.evict(mid, ver)
            used -= reg[ref].nbytes
