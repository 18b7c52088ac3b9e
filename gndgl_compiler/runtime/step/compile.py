"""Regional ``torch.compile`` (``train.compile: off|regional``): each sibling-fused module's program
(``FusedStage.forward``: bodies, aux heads, batched losses) compiled on its own, the rest eager.

Only the fused programs are compiled: they are the largest straight-line regions with static
shapes (the last partial batch is dropped), while the per-partition runner's many small programs
would each pay a compilation. Off by default; kept as an option because it is measured, not
assumed, to be faster:

    CPU, 1 thread, batch 32, resnet32_k8g4 (``benchmarks/compile_regional.py``, 2 cores shared
    with other jobs, load ~3.5): off 377-709 ms per step (median of 8-10 steps, three runs),
    regional 423 ms after 111 s of compilation (8 programs). The spread of the eager runs is larger
    than the difference: no measured gain, so the default stays ``off``. On CUDA it has not been
    measured yet (no GPU in the session that wrote it).

If ``torch.compile`` cannot be used here (no inductor / C++ compiler), the option falls back to
eager with a note rather than failing the run.
"""

from __future__ import annotations

from typing import Callable

MODES = ("off", "regional")


def compile_fused(stages: dict, mode: str, on_note: Callable[[str], None] | None = None) -> int:
    """Replace each fused stage's ``forward`` by its ``torch.compile``d form when ``mode`` is ``regional``.

    Args:
        stages: ``{stage index: FusedStage}`` (the executor's ``fused_stages``).
        mode: ``off`` or ``regional``.
        on_note: called with one line if compilation is unavailable.

    Returns:
        How many programs were wrapped (compilation itself happens at their first call).
    """
    if mode not in MODES:
        raise ValueError(f"train.compile must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off" or not stages:
        return 0
    try:
        import torch._inductor  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        if on_note:
            on_note(f"compile: regional unavailable ({exc}); running eagerly")
        return 0
    import torch._dynamo

    # every stage is FusedStage.forward on another instance: one compiled entry each, not "recompiles"
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 2 * len(stages) + 8)
    for fs in stages.values():
        fs.forward = torch.compile(fs.forward, dynamic=False)
    return len(stages)
