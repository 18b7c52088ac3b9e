"""RNG state of a training process: capture and restore Python's and torch's generators."""

from __future__ import annotations

import random
import warnings

import torch

from gndgl_compiler.errors import ArtifactError


def rng_state() -> dict:
    """Current states of Python's ``random`` and torch's CPU (and CUDA) generators.

    CUDA states are captured only when CUDA is already initialised, so this never
    creates a CUDA context.

    Returns:
        ``{"python": ..., "torch": ByteTensor, "cuda": [ByteTensor, ...]?}``, a
        structure :func:`flatten_state` can store.
    """
    state: dict = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore generator states captured by :func:`rng_state`.

    Args:
        state: the dict from :func:`rng_state` (possibly after a checkpoint round trip).

    Raises:
        ArtifactError: if a state is malformed. A CUDA state is restored only where
            CUDA is available (otherwise a warning says it was ignored).
    """
    try:
        if "python" in state:
            random.setstate(state["python"])
        if "torch" in state:
            torch.set_rng_state(state["torch"])
        if "cuda" in state:
            cuda_states = list(state["cuda"])
            if not torch.cuda.is_available():
                warnings.warn("checkpoint holds CUDA RNG states but CUDA is not available; they are ignored",
                              stacklevel=2)
            else:
                n = min(len(cuda_states), torch.cuda.device_count())
                if n < len(cuda_states):
                    warnings.warn(f"checkpoint holds {len(cuda_states)} CUDA RNG states, only {n} devices are "
                                  "visible", stacklevel=2)
                for i in range(n):
                    torch.cuda.set_rng_state(cuda_states[i], i)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"checkpoint RNG state is malformed ({exc}); "
                            "use another checkpoint or start a fresh run") from exc
