"""gndgl's command line (installed as ``gndgl_cli``): a thin Typer layer over ``gndgl_compiler``."""
