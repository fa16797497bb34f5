"""The project's two expected failures, at the bottom of every layer (``reliableswap.errors``
re-exports them). The CLI catches these and nothing else:

* :class:`UserError`: something the user can fix — a bad file, flag, recipe, contract line or
  folder, a missing model file. One line naming the file (``file:line``) and field; exit code 2.
* :class:`NothingUsable`: the run worked but found nothing to produce (no face in any input,
  every pair rejected). One line; exit code 1.

Anything else is a bug: "internal error", exit code 3, the traceback with ``--debug``. Every
exception class of the project subclasses one of the two, next to the builtin its callers
already catch (``ContractError(UserError, ValueError)``, ``OutputError(UserError, OSError)``).
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input a user can fix; ``str(err)`` is one line naming where (file:line, field or flag)."""


class NothingUsable(RuntimeError):
    """A run that produced nothing usable (exit code 1)."""
