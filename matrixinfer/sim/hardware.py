"""Hardware catalog: the one source of truth for chip, node and network numbers.

Every constant names its source. ``[paper §n]`` means "Serving Large Language Models on Huawei
CloudMatrix384" (arXiv 2506.12708) as restated in ``docs/reference-design.md`` §n; NVIDIA
figures come from the public datasheets named next to them. Nothing here is tuned to hit an
end-to-end result.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
TB = 1e12
TFLOPS = 1e12


@dataclass(frozen=True)
class ChipSpec:
    """One accelerator package (the unit that "per chip" / "per NPU" / "per GPU" figures count).

    A chip holds ``dies`` identical compute dies; every per-die figure is the chip figure divided
    by ``dies``. Peaks are dense (no sparsity).
    """

    name: str
    dies: int
    bf16_flops: float      # dense BF16 peak, FLOP/s per chip
    int8_flops: float      # dense INT8 peak, OP/s per chip
    fp8_flops: float       # dense FP8 peak, FLOP/s per chip (0: none)
    hbm_bytes: float       # HBM capacity per chip
    hbm_bw: float          # HBM bandwidth per chip, B/s
    scaleup_bw: float      # scale-up fabric bandwidth per chip, one direction, B/s (UB / NVLink)
    scaleout_bw: float     # RDMA NIC bandwidth per chip, one direction, B/s
    quant_flops_name: str  # which peak the "tok/s per TFLOPS" efficiency uses ("int8" / "fp8")
    matrix_cores_per_die: int = 0  # matrix cores a die's streams can be pinned to (0: not split)

    @property
    def low_precision_flops(self) -> float:
        """The peak used for INT8/FP8 GEMMs on this chip."""
        return self.fp8_flops if self.quant_flops_name == "fp8" else self.int8_flops

    def per_die(self, value: float) -> float:
        """Split a per-chip figure evenly over the chip's dies."""
        return value / self.dies


# --- Huawei Ascend 910C [paper §1] -------------------------------------------------------------
# 2 dies per package; per die 64 GB HBM at 1.6 TB/s; INT8 ~1,504 TOPS and BF16 ~752 TFLOPS per
# package; UB 7 x 224 Gbps = 196 GB/s per die one way (392 GB/s per NPU); RDMA 200 Gbps per die.
# 24 cube (matrix) cores + 48 vector cores per die: the decode pipeline pins each of its two
# streams to a share of them [paper §1, §4].
ASCEND_910C = ChipSpec(
    name="Ascend 910C",
    dies=2,
    bf16_flops=752 * TFLOPS,
    int8_flops=1504 * TFLOPS,
    fp8_flops=0.0,
    hbm_bytes=128 * GB,
    hbm_bw=3.2 * TB,
    scaleup_bw=392 * GB,
    scaleout_bw=2 * 200e9 / 8,
    quant_flops_name="int8",
    matrix_cores_per_die=24,
)

# --- NVIDIA Hopper, public datasheets ----------------------------------------------------------
# "NVIDIA H100 Tensor Core GPU Datasheet" (SXM5): BF16 989.4 TFLOPS dense, FP8/INT8 1,978.9 dense,
# 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s total (450 GB/s one way); one ConnectX-7 400 Gb/s NIC
# per GPU in HGX H100 nodes.
H100 = ChipSpec("H100 SXM", 1, 989.4 * TFLOPS, 1978.9 * TFLOPS, 1978.9 * TFLOPS, 80 * GB,
                3.35 * TB, 450 * GB, 400e9 / 8, "fp8")
# H800 SXM5 (export variant, same SM array and HBM as H100): NVLink cut to 400 GB/s total
# (200 GB/s one way) - NVIDIA H800 product brief; DeepSeek-V3 tech report (arXiv 2412.19437 §3.2)
# reports the same nodes with 400 Gb/s InfiniBand per GPU.
H800 = ChipSpec("H800 SXM", 1, 989.4 * TFLOPS, 1978.9 * TFLOPS, 1978.9 * TFLOPS, 80 * GB,
                3.35 * TB, 200 * GB, 400e9 / 8, "fp8")
# "NVIDIA H200 Tensor Core GPU" datasheet (SXM): same compute as H100, 141 GB HBM3e at 4.8 TB/s,
# NVLink 900 GB/s.
H200 = ChipSpec("H200 SXM", 1, 989.4 * TFLOPS, 1978.9 * TFLOPS, 1978.9 * TFLOPS, 141 * GB,
                4.8 * TB, 450 * GB, 400e9 / 8, "fp8")

CHIPS: dict[str, ChipSpec] = {"910c": ASCEND_910C, "h100": H100, "h800": H800, "h200": H200}


@dataclass(frozen=True)
class UBMeasurement:
    """Measured UB transfer per die, 512-byte messages [paper §1]."""

    path: str
    op: str
    inter_gbps: float
    intra_gbps: float
    inter_latency_us: float
    intra_latency_us: float


UB_MEASURED: tuple[UBMeasurement, ...] = (
    UBMeasurement("NPU-NPU", "read", 164, 167, 1.9, 1.2),
    UBMeasurement("NPU-NPU", "write", 135, 137, 2.1, 1.3),
    UBMeasurement("NPU-CPU", "read", 147, 151, 1.7, 1.0),
    UBMeasurement("NPU-CPU", "write", 107, 110, 1.9, 1.1),
)


def ub_measured(path: str, op: str) -> UBMeasurement:
    """The measured UB row for ``path`` ("NPU-NPU"/"NPU-CPU") and ``op`` ("read"/"write")."""
    for row in UB_MEASURED:
        if row.path == path and row.op == op:
            return row
    raise KeyError(f"no UB measurement for path={path!r} op={op!r}")


@dataclass(frozen=True)
class ClusterSpec:
    """A deployable unit: ``nodes`` nodes of ``chips_per_node`` chips.

    ``uniform_fabric`` marks a fabric where crossing nodes costs (almost) nothing, so an instance
    may span nodes at scale-up speed (the CloudMatrix384 UB plane). Otherwise chips in different
    nodes talk over the RDMA NICs only.
    """

    name: str
    chip: ChipSpec
    nodes: int
    chips_per_node: int
    uniform_fabric: bool
    vpc_bw_per_node: float        # storage / management network per node, B/s
    object_store_bw: float        # object-store read bandwidth for model loading, B/s
    cpu_dram_per_node: float      # host DRAM per node that a memory pool may use, bytes
    cpu_pool_bw_per_die: float    # chip <- pooled CPU DRAM, per die, B/s

    @property
    def chips(self) -> int:
        return self.nodes * self.chips_per_node

    @property
    def dies(self) -> int:
        return self.chips * self.chip.dies


# --- CloudMatrix384 [paper §1] -----------------------------------------------------------------
# 48 nodes x 8 NPUs; UB non-blocking all-to-all across the supernode (L2 not oversubscribed);
# VPC 400 Gbps per node through the DPU. Pool reads over UB run at the measured NPU<-CPU read
# rate (147 GB/s per die inter-node). Object-store load of 2.5 GB/s [paper §6 model caching].
# Host DRAM per node is not in the paper notes; 4 Kunpeng CPUs x 384 GB is an assumption that
# only bounds the pool's capacity (no result in `simulate paper` depends on it).
CM384_NODES = 48
CLOUDMATRIX384 = ClusterSpec(
    name="CloudMatrix384",
    chip=ASCEND_910C,
    nodes=CM384_NODES,
    chips_per_node=8,
    uniform_fabric=True,
    vpc_bw_per_node=400e9 / 8,
    object_store_bw=2.5 * GB,
    cpu_dram_per_node=1536 * GB,
    cpu_pool_bw_per_die=ub_measured("NPU-CPU", "read").inter_gbps * GB,
)

# UB switch structure [paper §1]: 7 L1 switch chips per node, L2 = 7 sub-planes x 16 chips,
# 48 ports x 28 GB/s each; each L1 chip has 16 uplinks (one per L2 chip of its sub-plane).
UB_L1_PER_NODE = 7
UB_L2_SUBPLANES = 7
UB_L2_CHIPS_PER_SUBPLANE = 16
UB_L2_PORTS = 48
UB_L2_PORT_BW = 28 * GB


def nvidia_cluster(chip: ChipSpec, nodes: int) -> ClusterSpec:
    """``nodes`` HGX nodes of 8 ``chip`` GPUs; NVLink inside a node, 400 Gb/s RDMA per GPU across.

    VPC/storage: a 2 x 100 Gb/s front-end network per node and a 2.5 GB/s object store (the
    paper's object-store figure, kept equal so model-loading comparisons isolate the pool).
    """
    if nodes < 1:
        raise ValueError(f"nvidia_cluster: nodes must be >= 1, got {nodes}")
    return ClusterSpec(
        name=f"{nodes}x HGX {chip.name}",
        chip=chip,
        nodes=nodes,
        chips_per_node=8,
        uniform_fabric=False,
        vpc_bw_per_node=200e9 / 8,
        object_store_bw=2.5 * GB,
        cpu_dram_per_node=2048 * GB,
        cpu_pool_bw_per_die=chip.scaleout_bw,
    )


def parse_hardware(spec: str) -> ClusterSpec:
    """Parse ``cm384`` or ``h100x8-nodes:N`` / ``h800x8-nodes:N`` / ``h200x8-nodes:N``."""
    spec = spec.strip().lower()
    if spec in ("cm384", "cloudmatrix384"):
        return CLOUDMATRIX384
    name, _, count = spec.partition(":")
    for key in ("h100", "h800", "h200"):
        if name == f"{key}x8-nodes":
            try:
                nodes = int(count)
            except ValueError:
                raise ValueError(f"--hardware {spec!r}: expected {key}x8-nodes:N with N an integer") from None
            return nvidia_cluster(CHIPS[key], nodes)
    raise ValueError(
        f"--hardware {spec!r}: expected cm384, h100x8-nodes:N, h800x8-nodes:N or h200x8-nodes:N"
    )
