"""What this machine offers the engines and trainers: CUDA or not, and how to share its CPU cores.

Every stage sizes itself from these answers, so they live below all of them.
"""

from __future__ import annotations

import os

# Up to this many cores, a CPU vLLM engine computes on every core (see cpu_reserved_cores).
SMALL_MACHINE_CORES = 4


def cuda_available() -> bool:
    """Whether torch is installed and sees a CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def cpu_threads_per_engine(engines: int) -> int:
    """OpenMP threads each of ``engines`` CPU vLLM engines on this machine should compute with.

    A CPU engine computes with exactly its OpenMP threads, and Ray sets an actor's
    ``OMP_NUM_THREADS`` to the CPUs it reserves, so the rollout stage sizes a CPU engine actor's
    reservation from this: the machine's cores, shared.
    """
    return max(1, (os.cpu_count() or 1) // engines)


def cpu_reserved_cores(cores: int | None = None) -> int:
    """Cores a CPU vLLM engine in multiprocess mode should leave to its scheduler process.

    vLLM keeps one core out of the model's OpenMP threads for the engine-core process, which polls
    while requests run. On a small machine that is a large share of the model's compute, so the
    scheduler shares every core instead; on a larger one an OpenMP thread that shares its core with
    the scheduler stalls every other thread at each barrier, so vLLM's default stays.
    """
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return 0 if cores <= SMALL_MACHINE_CORES else 1
