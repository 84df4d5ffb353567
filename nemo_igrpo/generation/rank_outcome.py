"""One rank's result, or its error, shared with the other ranks (the generation server is talked to by one rank).

An outcome is ``("ok", value)`` or ``("error", type name, message)``: picklable for ``broadcast_object``, and
re-raised on every rank as the same exception type.
"""

from __future__ import annotations

from nemo_igrpo.generation.server_http import ServerRequestError, ServerRestartedError, ServerUnavailableError

# Errors re-raised as their own type on the other ranks (callers catch these); any other becomes a RuntimeError.
_ERRORS = {cls.__name__: cls for cls in (ServerUnavailableError, ServerRestartedError, ServerRequestError,
                                          ValueError, PermissionError)}


def failure(error: Exception) -> tuple:
    """The outcome of a call that raised ``error``."""
    return ("error", type(error).__name__, str(error))


def unpack(outcome: tuple):
    """The value of an ("ok", value) outcome; raises the error of an ("error", type name, message) one."""
    if outcome[0] == "ok":
        return outcome[1]
    _, name, message = outcome
    raise _ERRORS.get(name, RuntimeError)(f"{message} (raised on the rank that talks to the server)")


def global_rank(group, rank: int) -> int:
    """The global rank of ``group``'s member ``rank`` (``broadcast_object`` takes global source ranks)."""
    import torch.distributed as dist

    return dist.get_global_rank(group, rank)
