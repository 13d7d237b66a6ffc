"""Session-wide test settings."""

import torch

# The test models are tiny: one thread is as fast as two, and it stays fast when the
# machine is shared (two torch threads per process on a loaded 2-core box thrash).
torch.set_num_threads(1)
