"""Exception types of gndgl.

Every error a user can cause derives from :class:`GndglError`. Its message says
what was wrong and what to do; the CLI prints it without a traceback and exits
with :attr:`GndglError.exit_code` (2 for bad input).
"""

from __future__ import annotations


class GndglError(Exception):
    """Base class of all user-facing gndgl errors."""

    exit_code: int = 2
    is_error: bool = True
    """False for a stop the user asked for (Ctrl-C): the CLI prints the message without 'error:'."""


class SpecError(GndglError):
    """A spec is invalid.

    Args:
        message: what was found and what is allowed.
        path: dotted field path inside the spec (``"cuts.width"``), or ``""``.
        line: 1-based YAML line of the field, when known.
        file: the spec file name, when known.
    """

    def __init__(self, message: str, path: str = "", line: int | None = None, file: str | None = None):
        self.message = message
        self.path = path
        self.line = line
        self.file = file
        super().__init__(self.format())

    def format(self) -> str:
        where = []
        if self.file:
            where.append(str(self.file) + (f":{self.line}" if self.line else ""))
        elif self.line:
            where.append(f"line {self.line}")
        if self.path:
            where.append(f"field '{self.path}'")
        prefix = ", ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class SpecErrors(SpecError):
    """Several spec errors found at once (all are reported)."""

    def __init__(self, errors: list[SpecError]):
        self.errors = errors
        first = errors[0]
        super().__init__(first.message, first.path, first.line, first.file)

    def format(self) -> str:  # noqa: D102
        if not getattr(self, "errors", None):
            return super().format()
        lines = [f"{len(self.errors)} problem(s) in the spec:"] if len(self.errors) > 1 else []
        lines += [("  - " if len(self.errors) > 1 else "") + e.format() for e in self.errors]
        return "\n".join(lines)


class GraphError(GndglError):
    """The network described by a spec cannot be built (shapes do not chain, ...)."""


class PartitionError(GndglError):
    """Cuts, groups or placement are impossible for this network.

    Args:
        message: what is impossible and what to do instead.
        field: the spec field to blame, e.g. ``("cuts", "width")``, when known.
    """

    def __init__(self, message: str, field: tuple[str, ...] | None = None):
        self.field = field
        super().__init__(message)


class ArtifactError(GndglError):
    """A compiled artifact or run directory is missing, tampered with or incompatible."""


class DataError(GndglError):
    """A data set cannot be found, read or decoded."""


class RunError(GndglError):
    """A training option, run directory or data set does not fit the run (bad input, exit 2)."""


class TrainingError(GndglError):
    """Training cannot start or had to stop (non-finite loss, out of memory, ...)."""

    exit_code = 1


class DeviceError(GndglError):
    """A requested device does not exist or cannot hold the placement."""


class DistributedError(GndglError):
    """A distributed run failed: a rank died, hung or could not connect."""

    exit_code = 1


class DistributedSetupError(DistributedError):
    """A distributed run cannot start as asked: --workers, --port or the placement (bad input, exit 2)."""

    exit_code = 2
