"""Model cache: warm start from the EMS pool vs cold start from safetensors files, in the same run.

Cold start builds the engine's model with ``load_model(path)`` from the checkpoint's files after
asking the kernel to drop their pages from the page cache (``posix_fadvise(DONTNEED)``; whether the
pages really left is measured with ``mincore`` and printed). Warm start builds the same model from
the tensors an EMS server on this host holds (``load_tensors_via_pool`` over the shared-memory fast
path, then ``load_model(path, tensors=...)``), after ``publish_tensors`` put them there. Each figure
is the median of ``--trials`` runs, cold and warm interleaved. Issue 5's bar: warm <= 0.2x cold.
Exit status 1 if the bar is missed.

    python benchmarks/model_cache.py                    # the default model (a few MB: overhead-bound)
    python benchmarks/model_cache.py --synthetic-gb 2   # a random DeepSeek-V3-shaped 2 GB checkpoint

Torch's large CPU allocations use transparent huge pages in both paths (THP_MEM_ALLOC_ENABLE=1)
unless --no-thp: on a VM, 4 KB first-touch faults on the new parameters otherwise dominate both.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Transparent huge pages for torch's large CPU allocations (read once, before torch allocates):
# first-touch page faults on the new model's parameters dominate both paths otherwise. It applies
# to cold and warm alike; --no-thp measures without.
if "--no-thp" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from matrixinfer.config import ModelConfig  # noqa: E402
from matrixinfer.ems.client import EmsClient  # noqa: E402
from matrixinfer.model.deepseek import DeepseekForCausalLM  # noqa: E402
from matrixinfer.model.loader import load_model  # noqa: E402
from matrixinfer.serve.pool import checkpoint_version, load_model_via_pool, load_tensors_via_pool, publish_tensors  # noqa: E402
from matrixinfer.sim.shapes import MODEL_CONFIGS  # noqa: E402

BAR = 0.2
GB = 1e9
SHAPE_SOURCE = MODEL_CONFIGS / "deepseek-v2-lite.config.json"
# V3 routing on DeepSeek-V2-Lite's dimensions (its 64 experts in 8 groups, as V3 groups its 256)
V3_ROUTING = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", scoring_func="sigmoid",
                  topk_method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True,
                  routed_scaling_factor=2.5)


def progress(msg: str) -> None:
    print(f"  ... {msg}", file=sys.stderr, flush=True)


# -- checkpoint files and the page cache ------------------------------------------------------------
def checkpoint_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def drop_page_cache(files: list[Path]) -> bool:
    """Ask the kernel to forget the files' cached pages; False if the call is unavailable or fails."""
    if not hasattr(os, "posix_fadvise"):
        return False
    try:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages (a just-written checkpoint) cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    except OSError:
        return False
    return True


def resident_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (``mincore``); None where it cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        resident = total = 0
        for f in files:
            size = f.stat().st_size
            if size == 0:
                continue
            with open(f, "rb") as fh, mmap.mmap(fh.fileno(), size, prot=mmap.PROT_READ) as mm:
                n = (size + page - 1) // page
                vec = (ctypes.c_ubyte * n)()
                view = np.frombuffer(mm, dtype=np.uint8)  # exposes the mapping's address
                ok = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec) == 0
                del view
                if not ok:
                    return None
                resident += sum(b & 1 for b in vec)
                total += n
        return resident / total if total else None
    except (OSError, AttributeError, TypeError, ValueError):
        return None


# -- a larger synthetic checkpoint -----------------------------------------------------------------
def synthetic_config(target_gb: float) -> dict:
    """DeepSeek-V2-Lite's dimensions with V3 routing and as many layers as fit in ``target_gb``
    (bf16); for small targets fewer routed experts."""
    base = json.loads(SHAPE_SOURCE.read_text())
    base.update(V3_ROUTING)

    def size(layers: int, experts: int) -> int:
        cfg = dict(base, num_hidden_layers=layers, n_routed_experts=experts)
        with torch.device("meta"):
            model = DeepseekForCausalLM(ModelConfig.from_dict(cfg))
        return sum(p.numel() * (4 if ".gate." in n else 2) for n, p in model.named_parameters())

    target = target_gb * GB
    layers, experts = 2, base["n_routed_experts"]
    while experts > 8 and size(layers, experts) > target:
        experts //= 2
    while size(layers + 1, experts) <= target:
        layers += 1
    base.update(num_hidden_layers=layers, n_routed_experts=experts, torch_dtype="bfloat16")
    return base


def write_synthetic(path: Path, target_gb: float) -> Path:
    """A random checkpoint (config.json + model.safetensors, bf16) of about ``target_gb`` GB."""
    from safetensors.torch import save_file

    from matrixinfer.model.default_model import write_byte_tokenizer
    from matrixinfer.model.export import export_state_dict

    cfg_dict = synthetic_config(target_gb)
    cfg = ModelConfig.from_dict(cfg_dict)
    progress(f"writing a synthetic checkpoint: {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts, "
             f"hidden {cfg.hidden_size}, vocab {cfg.vocab_size} -> {path}")
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
    path.mkdir(parents=True, exist_ok=True)
    save_file(export_state_dict(model), str(path / "model.safetensors"), metadata={"format": "pt"})
    del model
    (path / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    write_byte_tokenizer(path)
    return path


# -- EMS server --------------------------------------------------------------------------------------
def start_ems(capacity: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "matrixinfer.cli", "ems-server", "--capacity", str(capacity),
           "--listen", "127.0.0.1:0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "EMS server listening on" in line:
            return proc, line.split()[-1]
    proc.kill()
    raise RuntimeError(f"EMS server did not start: {' '.join(cmd)} (exit {proc.poll()})")


# -- measurements ----------------------------------------------------------------------------------
def cold_start(path: Path, dtype: torch.dtype, files: list[Path]) -> tuple[float, bool, float | None]:
    """Seconds to build the model from the files, whether the drop was accepted, resident fraction
    after the drop."""
    dropped = drop_page_cache(files)
    resident = resident_fraction(files)
    t0 = time.perf_counter()
    model = load_model(path, dtype=dtype, progress=False)
    elapsed = time.perf_counter() - t0
    del model
    gc.collect()
    return elapsed, dropped, resident


def warm_start(path: Path, dtype: torch.dtype, addr: str, model_id: str, staged: bool) -> float:
    """Seconds to connect to the pool, fetch the tensors and build the model from them: as a worker
    does (``load_model_via_pool``: the pool's bytes land in the parameters), or ``staged`` (fetch
    every tensor into its own buffer, then ``load_model(..., tensors=...)`` copies it again)."""
    t0 = time.perf_counter()
    with EmsClient([addr], namespace="matrixinfer") as client:
        if staged:
            tensors, _ = load_tensors_via_pool(client, path, model_id)
            model = None if tensors is None else load_model(path, dtype=dtype, progress=False, tensors=tensors)
            del tensors
        else:
            model, _ = load_model_via_pool(client, path, model_id, dtype)
        if model is None:
            raise RuntimeError(f"model cache miss for {model_id} at {addr}")
    elapsed = time.perf_counter() - t0
    del model
    gc.collect()
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: the built-in model)")
    ap.add_argument("--synthetic-gb", type=float, help="write and use a random DeepSeek-V3-shaped checkpoint "
                                                       "of about this many GB (bf16) instead")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--no-thp", action="store_true", help="leave torch's CPU allocations on 4 KB pages")
    args = ap.parse_args()

    tmp = None
    if args.synthetic_gb:
        tmp = tempfile.TemporaryDirectory(prefix="matrixinfer-model-cache-")
        path = write_synthetic(Path(tmp.name) / f"synthetic-v3-{args.synthetic_gb:g}gb", args.synthetic_gb)
    else:
        from matrixinfer.model.default_model import default_model_path

        path = args.model or default_model_path()
    files = checkpoint_files(path)
    nbytes = sum(f.stat().st_size for f in files)
    dtype = _config_dtype(path)
    model_id = path.name
    print(f"model cache benchmark: {path} ({len(files)} file(s), {nbytes / GB:.3f} GB, {dtype}), "
          f"{args.trials} trials, torch threads {torch.get_num_threads()}, huge pages for torch allocations: "
          f"{'on' if os.environ.get('THP_MEM_ALLOC_ENABLE') == '1' else 'off'} (both paths)", flush=True)

    proc, addr = start_ems(int(nbytes * 1.25) + (64 << 20))
    try:
        progress(f"EMS server at {addr}; publishing {model_id}")
        t0 = time.perf_counter()
        with EmsClient([addr], namespace="matrixinfer") as client:
            written = publish_tensors(client, path, model_id, checkpoint_version(path))
            fast = any(c.arena is not None for c in client._local.conns.values())
        print(f"published {written / GB:.3f} GB to the EMS model cache in {time.perf_counter() - t0:.2f} s "
              f"(same-host shared-memory path: {'yes' if fast else 'no'})", flush=True)
        if written == 0:
            raise RuntimeError("publish_tensors wrote nothing: is the EMS capacity too small?")
        progress("warming up both paths (imports, first mappings; not measured)")
        cold_start(path, dtype, files)
        warm_start(path, dtype, addr, model_id, staged=False)
        cold, warm, staged, drops, resident = [], [], [], [], []
        for i in range(args.trials):
            c, dropped, res = cold_start(path, dtype, files)
            cold.append(c)
            drops.append(dropped)
            resident.append(res)
            progress(f"trial {i + 1}/{args.trials}: cold {c:.3f} s (page cache drop "
                     f"{'accepted' if dropped else 'failed'}, resident after drop "
                     f"{'unknown' if res is None else f'{res:.0%}'})")
            warm.append(warm_start(path, dtype, addr, model_id, staged=False))
            staged.append(warm_start(path, dtype, addr, model_id, staged=True))
            progress(f"trial {i + 1}/{args.trials}: warm {warm[-1]:.3f} s, warm staged {staged[-1]:.3f} s")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if tmp is not None:
            tmp.cleanup()

    c, w = statistics.median(cold), statistics.median(warm)
    known = [r for r in resident if r is not None]
    drop_note = ("page cache dropped (posix_fadvise DONTNEED), "
                 + (f"max {max(known):.0%} of pages resident after the drop" if known else "residency unknown")
                 if all(drops) else "page cache NOT dropped (posix_fadvise unavailable or failed): cold is optimistic")
    ratio = w / c
    print(f"cold start (safetensors files):  median {c:.3f} s  {nbytes / GB / c:6.2f} GB/s   [{drop_note}]")
    s = statistics.median(staged)
    print(f"warm start (EMS model cache):    median {w:.3f} s  {nbytes / GB / w:6.2f} GB/s   "
          f"[load_model_via_pool: into the parameters, as workers load]")
    print(f"  for contrast, staged:          median {s:.3f} s  {nbytes / GB / s:6.2f} GB/s   "
          f"[load_tensors_via_pool + load_model(tensors=...): two copies]")
    print(f"warm/cold = {ratio:.3f}  (bar <= {BAR})  {'PASS' if ratio <= BAR else 'FAIL'}")
    return 0 if ratio <= BAR else 1


def _config_dtype(path: Path) -> torch.dtype:
    """The checkpoint's dtype as config.json states it (float32 if absent)."""
    name = json.loads((path / "config.json").read_text()).get("torch_dtype") or "float32"
    return getattr(torch, name, torch.float32)


if __name__ == "__main__":
    sys.exit(main())
