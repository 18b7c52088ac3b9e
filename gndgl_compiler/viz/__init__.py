"""Pictures of compiled plans: partition graphs (DOT/SVG/PNG), a terminal tree,
sweep tables with a Figure-3 bubble chart, and training curves.

Matplotlib and rich are imported inside the functions that need them, and the names below
on first use (PEP 562), so importing this package (or :mod:`.style`) is cheap: no torch.
"""

from __future__ import annotations

from ..lazy import lazy_names

_LAZY = {"choose_level": ".dot", "plan_to_dot": ".dot", "RenderError": ".render", "output_format": ".render",
         "render_dot": ".render", "load_plan": ".source"}
"""Public name → the module that defines it, imported when the name is first used."""

__all__ = ["RenderError", "choose_level", "load_plan", "output_format", "plan_to_dot", "render_dot"]

__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
