"""Load generator and reports behind ``matrixinfer bench``.

- ``datasets``: seeded workloads (random lengths, shared-prefix groups) and Poisson arrival times.
- ``metrics``: per-request records and their summary (throughput, percentiles, goodput).
- ``client``: async httpx driver that streams /v1/completions and times each chunk.
- ``report``: text table and JSON result.
- ``cli``: the ``bench`` subcommand.
"""
