"""Session-wide test settings.

Without a GPU, Triton kernels run in the CPU interpreter. TRITON_INTERPRET must be set before triton is
first imported, which is why it lives here rather than in a test module. On a CUDA machine it is left
alone so the kernels compile for the GPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
