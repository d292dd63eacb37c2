"""phoneagent: a Twilio phone line answered by an end-to-end realtime speech model."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("phoneagent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
