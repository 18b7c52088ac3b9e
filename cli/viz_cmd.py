"""placeholder"""


def register(app):
    """Add commands."""
