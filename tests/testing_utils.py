"""Skip markers in one place (like TRL's testing_utils)."""

from __future__ import annotations

import pytest

from tasks.serving.local import has_cuda_gpu

requires_gpu = pytest.mark.skipif(not has_cuda_gpu(), reason="needs a CUDA GPU (nvidia-smi lists none)")
