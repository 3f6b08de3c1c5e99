"""Model surgery and routing state: ``attach_lag(model, libraries, LAGConfig(...))`` wraps the Linear modules
the libraries adapt and routes every forward.

* :mod:`.surgery`: :class:`LAGLinear` (the wrapped module), :class:`LAGRouter` (attach / detach, settings,
  trace, timing, focus, the per-token hot path) and :func:`attach_lag`;
* :mod:`.state`: per-request settings and recorders, per-sequence state;
* :mod:`.pool`: the attached libraries of one kind as one set of adapters;
* :mod:`.sequence`: sequence-level and two-level routing (the pre-pass, shortlists).
"""

from .pool import APPROXIMATE, Pool
from .state import ForwardState, RequestState
from .surgery import LAGLinear, LAGRouter, attach_lag

__all__ = ["APPROXIMATE", "ForwardState", "LAGLinear", "LAGRouter", "Pool", "RequestState", "attach_lag"]
