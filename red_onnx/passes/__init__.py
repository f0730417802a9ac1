"""The passes, in pipeline order. Canonicalization (``fold``) always runs first.

Each pass is a module with ``NAME`` and ``run(ctx: Context) -> PassResult``.
"""

from . import fold, hash, merge, separate

#: Every pass of the design, in pipeline order; those not yet implemented are refused by name.
PLANNED = ("merge", "separate", "hash")

#: The passes that exist, by name.
AVAILABLE: dict = {merge.NAME: merge, separate.NAME: separate, hash.NAME: hash}

__all__ = ["fold", "merge", "separate", "hash", "AVAILABLE", "PLANNED"]
