"""Metrics from executors to the driver: the event format and the channel that carries it."""

from .events import EVENT_VERSION, make_event
from .channel import ChannelClient, DriverChannel

__all__ = ["EVENT_VERSION", "ChannelClient", "DriverChannel", "make_event"]
