"""Suite-wide test settings."""

import torch

# One intra-op thread: on a 2-core machine shared with other processes (CI, data workers),
# OpenMP threads that wait on each other made parts of the suite 20x slower.
torch.set_num_threads(1)
