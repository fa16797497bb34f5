"""The two expected failures every command may raise (defined in :mod:`triplets.errors`, the
bottom layer, so that the light ``triplets`` package shares them): :class:`UserError` (exit 2)
and :class:`NothingUsable` (exit 1). Anything else reaching the CLI is an internal error."""

from triplets.errors import NothingUsable, UserError

__all__ = ["NothingUsable", "UserError"]
