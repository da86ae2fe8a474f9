"""`quill` with Muon's Newton-Schulz iteration in float32 on every device, for tests that compare
runs whose gradients are summed in different orders (DDP against one process): in bfloat16, the
few gradient bits that the order changes flip roundings and blur the comparison.

    python -m torch.distributed.run --nproc_per_node=2 tests/quill_fp32_muon.py train ...
"""

from __future__ import annotations

import sys

from quillgpt import optim


def float32_newton_schulz() -> None:
    optim.native_bfloat16 = lambda device: False  # orthogonalize() reads it from the module


if __name__ == "__main__":
    float32_newton_schulz()
    from quillgpt.cli import main

    sys.exit(main(sys.argv[1:]))
