import os

import torch

# The Triton kernels run on the CPU through the interpreter; it must be chosen before triton is
# first imported. On a GPU machine the kernels run natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
