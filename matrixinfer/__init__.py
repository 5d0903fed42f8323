"""MatrixInfer: CloudMatrix-Infer's serving design for CPUs and NVIDIA GPUs."""

__version__ = "0.1.0"
