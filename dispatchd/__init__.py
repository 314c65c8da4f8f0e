"""dispatchd: one service that syncs dispatches and tells actors over AMQP."""

from functools import cache


@cache
def _version() -> str:
    # importlib.metadata costs ~50 ms of imports: only what asks for the version pays it.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dispatchd")
    except PackageNotFoundError:  # running from a source tree without install
        return "0.0.0+unknown"


def __getattr__(name: str) -> str:
    """``dispatchd.__version__``, looked up when first asked for."""
    if name == "__version__":
        return _version()
    raise AttributeError(f"module 'dispatchd' has no attribute {name!r}")
