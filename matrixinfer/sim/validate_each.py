"""``simulate validate --profile-each``: a fresh profile of what each scenario reads, right before it runs.

The machine here drifts in speed by up to 2x over minutes, so each scenario (and each repeat of
it) is simulated from operator points measured seconds before its measured run, with the thread
count of its deployment: the colocated engine's team uses all cores, each P/D worker half of them
(``serve``'s default split). Which points are re-measured comes from
:mod:`matrixinfer.sim.profile_focus`; the measurement is :func:`matrixinfer.sim.profiler.measure`,
the same operator timings ``matrixinfer profile`` takes, on the engine's kind of thread. The model
is loaded once, here, for all of them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from matrixinfer.config import ModelConfig
from matrixinfer.sim.local_cost import LocalCostModel
from matrixinfer.sim.local_ops import Dims
from matrixinfer.sim.profile_data import Profile
from matrixinfer.sim.profile_focus import RecordingCostModel, focus_grid, merge
from matrixinfer.sim.profiler import deployment_threads
from matrixinfer.sim.validate import Scenario, Setup, load_setup, simulate_scenario


@dataclass
class FocusedProfiles:
    """The base setup (from ``--profile`` or a small grid taken at start) and the loaded model."""

    setup: Setup
    model: object
    device: torch.device
    dims: Dims
    pd_base_pending: bool = False  # no --profile: the P/D base is taken before the first P/D scenario

    @classmethod
    def start(cls, profile_path: Path | None, model: str | None) -> FocusedProfiles:
        from matrixinfer.model.default_model import default_model_path
        from matrixinfer.model.loader import load_model
        from matrixinfer.sim.profiler import GRIDS, measure

        if profile_path is not None:
            setup = load_setup(profile_path, model)
            device = torch.device(str(setup.colocated.profile.meta.get("device") or "cpu"))
        else:
            from matrixinfer.model.device import resolve_device

            device = resolve_device(None)
        model_path = setup.model_path if profile_path is not None else Path(model) if model else default_model_path()
        loaded = load_model(model_path, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16,
                            device=device, progress=False)
        cfg = ModelConfig.from_dict(json.loads((model_path / "config.json").read_text()))
        dims = Dims.of(cfg)
        if profile_path is None:
            cores = os.cpu_count() or 1
            colocated = measure(model_path, GRIDS["small"], device, deployment_threads("colocated", cores), loaded)
            setup = Setup(model_path, cfg, LocalCostModel(colocated, dims),
                          LocalCostModel(colocated, dims, in_api_process=False),
                          [f"no --profile: the base is the small grid, taken now ({colocated.meta['wall_s']} s; "
                           "the P/D workers' before the first P/D scenario)"])
        return cls(setup, loaded, device, dims, pd_base_pending=profile_path is None)

    def for_scenario(self, sc: Scenario) -> tuple[Setup, Profile]:
        """The setup to simulate ``sc`` from: the base with the tables its simulation reads measured
        now; and the fresh profile itself (its header says when and at what load)."""
        from matrixinfer.sim.profiler import GRIDS, measure

        colocated = sc.deployment == "colocated"
        if not colocated and self.pd_base_pending:
            threads = deployment_threads("pd", os.cpu_count() or 1)
            pd = measure(self.setup.model_path, GRIDS["small"], self.device, threads, self.model)
            self.setup = replace(self.setup, pd=LocalCostModel(pd, self.dims, in_api_process=False))
            self.pd_base_pending = False
        base = (self.setup.colocated if colocated else self.setup.pd).profile
        recorder = RecordingCostModel(base, self.dims, in_api_process=colocated)
        simulate_scenario(sc, replace(self.setup, colocated=recorder, pd=recorder))
        grid = focus_grid(base, recorder.seen, self.dims, pd=not colocated)
        threads = deployment_threads(sc.deployment, os.cpu_count() or 1)
        fresh = measure(self.setup.model_path, grid, self.device, threads, self.model)
        cost = LocalCostModel(merge(base, fresh), self.dims, in_api_process=colocated)
        return (replace(self.setup, colocated=cost) if colocated else replace(self.setup, pd=cost)), fresh
