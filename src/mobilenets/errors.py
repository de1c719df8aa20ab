"""The one error base class: a mistake the user can fix, printed by the CLI as one line.

Every module raises a subclass of :class:`MobilenetsError` for bad input (a
file, an argument, a folder) so that the CLI can catch exactly these and let
a programming bug surface as a traceback. Messages name parameters, not flags,
and say what would work.
"""

from __future__ import annotations


class MobilenetsError(ValueError):
    """Bad input a user can fix. Subclasses ``ValueError`` so ``except ValueError`` callers keep working."""


class ParameterError(MobilenetsError):
    """A parameter outside what works (a number out of its bounds, a name not among the choices)."""


class ParameterTypeError(ParameterError, TypeError):
    """A parameter of the wrong kind (text for a number); also a ``TypeError``, as Python's convention has it."""


class WeightsError(MobilenetsError):
    """Weights that cannot be converted, loaded or fetched; the message says why and what would work."""


class MissingWeightsError(WeightsError, FileNotFoundError):
    """A weights path that does not exist (also a FileNotFoundError, for callers that catch that)."""


class MetadataError(WeightsError):
    """Metadata of a set of weights (resolution, normalization, labels, int8 data) that cannot be right."""


class QuantizeError(MobilenetsError):
    """int8 preparation that cannot run on the given model or data; the message says what would work."""
