"""Pictures of compiled plans: partition graphs (DOT/SVG/PNG), a terminal tree,
sweep tables with a Figure-3 bubble chart, and training curves.

Matplotlib and rich are imported inside the functions that need them, so importing
this package is cheap.
"""

from .dot import choose_level, plan_to_dot
from .render import RenderError, output_format, render_dot
from .source import load_plan

__all__ = ["RenderError", "choose_level", "load_plan", "output_format", "plan_to_dot", "render_dot"]
