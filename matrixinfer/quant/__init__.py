"""Training-free INT8 (W8A8) quantization, after the reference design's five steps (docs/reference-design.md §7).

- :mod:`.int8`: the arithmetic (per-token / per-channel quantization, the INT8 GEMM, Hadamard
  rotation) shared by the runtime modules and the quantizer; :mod:`.format`: the checkpoint layout.
  Both are leaves the model runtime imports.
- :mod:`.policy`: the pure decisions (which modules stay in high precision, smoothing scales,
  search grids, the recipe of switchable steps); :mod:`.search`: the per-layer searches.
- :mod:`.calibration`: calibration and evaluation text; :mod:`.quantizer`: the offline pass over a
  checkpoint; :mod:`.checkpoint`: writing the INT8 checkpoint; :mod:`.cli`: ``matrixinfer quantize``.

Nothing here is imported by ``import matrixinfer.quant`` beyond this docstring.
"""
