"""The one error type kernel launchers raise for bad arguments."""

from __future__ import annotations

__all__ = ["KernelArgumentError"]


class KernelArgumentError(ValueError):
    """A launcher got a tensor of the wrong shape, stride, dtype or device, or a bad scalar.

    Raised before anything is launched, so nothing has been written when it is seen.
    """
