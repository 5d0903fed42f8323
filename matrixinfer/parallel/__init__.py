"""Expert parallelism: one serving instance over N ranks (DP attention + EP MoE).

Module map: :mod:`placement` (the expert-placement table, pure), :mod:`dispatch` (payload
encoding and bytes per token, pure), :mod:`group` (the rank group over ``torch.distributed``:
collectives with timeouts, static buffers, metrics), :mod:`ep_moe` (the expert-parallel experts
backend: dispatch, local experts, combine), :mod:`dp_engine` (DP attention: every rank its own
scheduler and paged KV cache, stepping in lockstep), :mod:`launch` (rank processes, torchrun's
environment).
"""
