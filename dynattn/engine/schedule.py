"""When to ask the flush policy (:class:`FlushSchedule`).

The engine flushes when its pending update count reaches the policy's threshold. Asking after
every update would cost as much as the update, so a policy that can tell how long its answer
holds (``valid_until(engine)``, an update count) is asked again only then, or at the
threshold. Invariant: ``check_at`` is the pending count at which the policy must be asked next
(0: at the next update); the engine turns it into a log length for its hot path, so a single
update counts nothing itself. What a policy returns is checked before anything depends on it:
a threshold must be a real number (``inf``: not now), never NaN.
"""

from __future__ import annotations

import math
import numbers

from ..policies import as_policy


class PolicyError(TypeError):
    """A flush policy returned something that is not a threshold."""


class FlushSchedule:
    """The engine's policy and the pending count at which to consult it next.

    Parameters
    ----------
    policy : None, int, callable or policy object
        See :func:`dynattn.policies.as_policy`.
    """

    def __init__(self, policy):
        self.policy = as_policy(policy)
        # the optional hooks of the FlushPolicy protocol, resolved once here, not per update
        self._valid_until = getattr(self.policy, "valid_until", None)
        self.before_flush = getattr(self.policy, "before_flush", None)
        self.on_flush = getattr(self.policy, "on_flush", None)
        # unless a policy says it reads only counters and logs, it may read exact answers
        self.reads_answers = bool(getattr(self.policy, "reads_answers", True))
        self.check_at = 0

    def ask(self, engine) -> tuple[float, float]:
        """The policy's threshold, checked (a real number, not NaN), and how many more updates
        it holds for (0 when the policy cannot tell)."""
        value = self.policy.threshold(engine)
        plain = (type(value) is float or type(value) is int) and value == value  # the usual
        if not plain and (
            isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value)
        ):
            raise PolicyError(
                f"policy {self.policy!r} returned threshold {value!r}; a flush policy's "
                "threshold(engine) must return a number (math.inf for 'not now')"
            )
        until = self._valid_until
        hold = until(engine) - engine.n_updates if until is not None else 0
        return value, hold if hold >= 0 else 0  # NaN or past: ask at the next update

    def plan(self, pending: int, threshold: float, hold: float, room: int) -> None:
        """Set ``check_at`` after a consultation that did not flush: at the threshold, after
        the ``hold``, or once ``room`` more updates fill the log, whichever comes first."""
        ask = min(pending + 1 + hold, pending + room)
        self.check_at = threshold if threshold < ask else ask
