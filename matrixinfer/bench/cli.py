"""``matrixinfer bench``: load-test a running OpenAI-compatible server and report latency and throughput."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand."""
    p = subparsers.add_parser(
        "bench",
        help="load-test a running OpenAI-compatible server (TTFT, TPOT, throughput, goodput)",
        description="Load-test a running OpenAI-compatible server: streamed /v1/completions with token-id "
        "prompts at a Poisson request rate or fixed concurrency; reports throughput, TTFT, TPOT, ITL, "
        "end-to-end latency and goodput as a table and JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address")
    p.add_argument("--model", default="", help="model id to request (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--dataset", choices=("random", "shared-prefix"), default="random")
    p.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    p.add_argument("--input-len", default="128:512", help="random: prompt length range MIN:MAX (or N)")
    p.add_argument("--output-len", default="32:128", help="output length range MIN:MAX (or N)")
    p.add_argument("--num-groups", type=int, default=4, help="shared-prefix: number of prefix groups")
    p.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: tokens shared within a group")
    p.add_argument("--suffix-len", type=int, default=64, help="shared-prefix: unique tokens per request")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="token ids are drawn from [10, V) (default: from /v1/models, else 1000)")
    p.add_argument(
        "--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second; inf sends all at once"
    )
    p.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT target in ms")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT target in ms")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request connect/read timeout in seconds")
    p.add_argument("--seed", type=int, default=0, help="seed for lengths, token ids and arrival times")
    p.add_argument("--result-json", default=None, help="write the config, summary and per-request records here")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def build_dataset(args: argparse.Namespace, vocab_size: int) -> list:
    """The request list named by ``--dataset`` and its length options."""
    from matrixinfer.bench import datasets

    output_len = datasets.parse_range(args.output_len)
    if args.dataset == "random":
        return datasets.random_dataset(
            args.num_prompts, datasets.parse_range(args.input_len), output_len, vocab_size, args.seed
        )
    return datasets.shared_prefix_dataset(
        args.num_prompts, args.num_groups, args.prefix_len, args.suffix_len, output_len, vocab_size, args.seed
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; exit status 0 if any request succeeded, 1 if none did, 2 on bad options."""
    import asyncio
    from dataclasses import replace

    from matrixinfer.bench.client import BenchConfig, resolve_model, run_benchmark
    from matrixinfer.bench.metrics import speculation, summarize
    from matrixinfer.bench.report import format_table, result_document, write_json

    if args.num_prompts < 1:
        print(f"error: --num-prompts must be at least 1, got {args.num_prompts}", file=sys.stderr)
        return 2
    config = BenchConfig(
        base_url=args.base_url.rstrip("/"),
        model=args.model,
        api_key=args.api_key,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        timeout_s=args.timeout,
        seed=args.seed,
        show_progress=not args.disable_tqdm,
    )
    try:
        model, vocab_size = asyncio.run(resolve_model(config, args.vocab_size))
        specs = build_dataset(args, vocab_size)
        config = replace(config, model=model)
        before = _server_counters(config.base_url)
        records, duration = asyncio.run(run_benchmark(specs, config))
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = summarize(records, duration, args.slo_ttft_ms, args.slo_tpot_ms)
    spec = speculation(before, _server_counters(config.base_url))
    print(format_table(summary, speculation=spec))
    if args.result_json:
        settings = {k: v for k, v in vars(args).items() if k not in ("func", "command", "api_key")}
        settings.update(base_url=config.base_url, model=model, vocab_size=vocab_size)
        doc = result_document(summary, settings, records)
        if spec is not None:
            doc["speculation"] = spec
        write_json(args.result_json, doc)
        print(f"wrote {args.result_json}")
    return 0 if summary.completed else 1


def _server_counters(base_url: str) -> dict[str, float]:
    """The server's unlabelled /metrics samples, or {} when it exports none (another server)."""
    import httpx

    from matrixinfer.bench.launch import unlabelled_metrics

    try:
        r = httpx.get(f"{base_url}/metrics", timeout=5)
        return unlabelled_metrics(r.text) if r.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return {}
