"""Started on ``PYTHONPATH`` by tests/conftest.py when ``MATRIXINFER_TEST_PRETEND_GPU=1``: every child
Python process then sees ``torch.cuda.is_available()`` as True, as it would on a machine with a GPU.

A test that let any process pick its device by default would then try CUDA (which this CPU build
of torch lacks) and fail, as such tests failed on a real GPU machine.
"""

import os

if os.environ.get("MATRIXINFER_TEST_PRETEND_GPU") == "1":
    import torch

    torch.cuda.is_available = lambda: True
