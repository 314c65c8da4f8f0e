"""dispatchd: one service that syncs dispatches and tells actors over AMQP."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dispatchd")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"
