import os

import pytest
import torch

# Tests use tiny models: one thread avoids OpenMP's synchronization cost, which dominates tiny matmuls and
# grows badly when other processes share the cores.
torch.set_num_threads(1)

# Fused ops fill every fresh output buffer with NaN in tests: an unwritten element cannot pass as zero.
os.environ.setdefault("HMLSTM_POISON_OUTPUTS", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this when a
# kernel is decorated, so it must be set before any module of hmlstm.ops.triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
