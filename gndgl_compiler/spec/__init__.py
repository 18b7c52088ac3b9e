"""Spec front end: YAML → validated :class:`Spec` (pydantic), templates expanded."""

from .load import load_spec, parse_spec, spec_error
from .models import Spec
from .templates import expand_model

__all__ = ["Spec", "expand_model", "load_spec", "parse_spec", "spec_error"]
