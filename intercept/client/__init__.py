"""The developer's side: sessions to agents, the local process, ``intercept start``."""

from intercept.client.session import AgentSession, InterceptOptions
from intercept.events import Event
from intercept.client.start import default_name, start
from intercept.client.transport import DirectTransport, Transport

__all__ = [
    "AgentSession",
    "DirectTransport",
    "Event",
    "InterceptOptions",
    "Transport",
    "default_name",
    "start",
]
