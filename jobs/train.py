"""`ray job submit --working-dir . -- "$PWD/.venv/bin/python" jobs/train.py --config configs/train.yaml [--set key=value ...]`

A thin entry point: the same code path as `nat-ray train`.
"""

import sys
from pathlib import Path

# Run the submitted working directory's nat_ray, not whatever version the node has installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nat_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
