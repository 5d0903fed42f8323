"""A rank >= 1 of an EP instance: ``python -m matrixinfer.parallel.rank <engine flags>`` with
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). It serves the
requests rank 0 gives it until rank 0 says stop; exits 3 when the instance fails. With
``MATRIXINFER_EP_CONNECTOR`` set (by the launcher of a P/D instance with the EMS pool) it builds its
own EMS connector, authenticated with the deployment secret from its environment."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import msgspec

from matrixinfer import envs
from matrixinfer.cli_args import add_dataclass_args, from_args
from matrixinfer.config import EngineConfig
from matrixinfer.engine.kv_connector import KVConnector
from matrixinfer.parallel.dp_engine import follow
from matrixinfer.parallel.group import RankEnv, RankFailure
from matrixinfer.parallel.launch import build_rank
from matrixinfer.parallel.messages import CONNECTOR_ENV, RankConnector


def ems_connector() -> KVConnector | None:
    """This rank's EMS connector, from :data:`CONNECTOR_ENV` and the deployment secret (None without)."""
    raw = os.environ.get(CONNECTOR_ENV)
    if not raw:
        return None
    from matrixinfer.auth import load_secret
    from matrixinfer.serve.pool import EmsConnector, ems_client

    spec = msgspec.json.decode(raw, type=RankConnector)
    client = ems_client(spec.servers, spec.controller, load_secret())
    return EmsConnector(client, spec.block_size, spec.namespace, read=spec.store == "prompt", store=spec.store)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matrixinfer.parallel.rank", description=__doc__)
    add_dataclass_args(parser, EngineConfig)
    cfg = from_args(EngineConfig, parser.parse_args(argv))
    env = RankEnv.from_environ()
    logging.basicConfig(level=envs.log_level(), format=f"%(asctime)s EP rank {env.rank} %(levelname)s %(message)s")
    if env.rank == 0:
        print("error: rank 0 is the serving process (matrixinfer serve --ep N)", file=sys.stderr)
        return 2
    engine, group = build_rank(cfg, env, connector=ems_connector())
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
