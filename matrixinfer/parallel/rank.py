"""A rank >= 1 of an EP instance: ``python -m matrixinfer.parallel.rank <engine flags>`` with
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). It serves the
requests rank 0 gives it until rank 0 says stop; exits 3 when the instance fails."""

from __future__ import annotations

import argparse
import logging
import sys

from matrixinfer import envs
from matrixinfer.cli_args import add_dataclass_args, from_args
from matrixinfer.config import EngineConfig
from matrixinfer.parallel.dp_engine import follow
from matrixinfer.parallel.group import RankEnv, RankFailure
from matrixinfer.parallel.launch import build_rank


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matrixinfer.parallel.rank", description=__doc__)
    add_dataclass_args(parser, EngineConfig)
    cfg = from_args(EngineConfig, parser.parse_args(argv))
    env = RankEnv.from_environ()
    logging.basicConfig(level=envs.log_level(), format=f"%(asctime)s EP rank {env.rank} %(levelname)s %(message)s")
    if env.rank == 0:
        print("error: rank 0 is the serving process (matrixinfer serve --ep N)", file=sys.stderr)
        return 2
    engine, group = build_rank(cfg, env)
    try:
        follow(engine, group)
    except RankFailure as e:
        print(f"EP rank {env.rank}: {e}", file=sys.stderr)
        return 3
    finally:
        group.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
