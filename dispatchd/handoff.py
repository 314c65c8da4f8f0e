"""``dispatchd run`` in two process images: one loads the configuration, the other runs.

Loading needs pydantic and pydantic-settings, about 12 MiB that a
long-running daemon would keep for nothing. So once ``run`` has validated its
settings it replaces its own process image (same pid, signals, stdout and
stderr, so supervisors see nothing) with ``python -m dispatchd.handoff``,
which reads the validated :class:`~dispatchd.settings.Settings` back and runs
the daemon without ever importing pydantic.

The settings travel as a pickle in an anonymous in-memory file whose
descriptor survives ``exec``: both ends are this program in one process, so
nothing else writes what is read back.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Sequence

from dispatchd.settings import Settings

__all__ = ["FD_OPTION", "main", "read_settings", "settings_descriptor"]

FD_OPTION = "--settings-fd"


def settings_descriptor(settings: Settings) -> int:
    """An in-memory file holding ``settings``, positioned for :func:`read_settings`.

    Not close-on-exec, so it survives the exec in :func:`main`.
    """
    descriptor = os.memfd_create("dispatchd-settings", 0)
    os.write(descriptor, pickle.dumps(settings, protocol=pickle.HIGHEST_PROTOCOL))
    os.lseek(descriptor, 0, os.SEEK_SET)
    return descriptor


def main(settings: Settings) -> int:
    """Run the daemon with ``settings`` in a fresh process image; returns only if exec fails."""
    descriptor = settings_descriptor(settings)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # exec drops what is still buffered
    os.execv(
        sys.executable,
        [sys.executable, "-m", "dispatchd.handoff", FD_OPTION, str(descriptor)],
    )


def read_settings(descriptor: int) -> Settings:
    """The settings :func:`main` left in ``descriptor``, which is closed after reading."""
    with os.fdopen(descriptor, "rb") as source:
        settings = pickle.load(source)
    if not isinstance(settings, Settings):
        raise TypeError(f"descriptor {descriptor} holds no dispatchd settings")
    return settings


def _daemon_image(argv: Sequence[str]) -> int:
    """The second image: the daemon, with errors reported as ``dispatchd run`` reports them."""
    if len(argv) != 2 or argv[0] != FD_OPTION or not argv[1].isdigit():
        print(
            f"usage: python -m dispatchd.handoff {FD_OPTION} N (started by 'dispatchd run')",
            file=sys.stderr,
        )
        return 2
    from dispatchd import cli
    from dispatchd.logs import configure_from_settings, quiet_grpc_core

    try:
        settings = read_settings(int(argv[1]))
    except (OSError, pickle.UnpicklingError, TypeError, EOFError) as exc:
        return cli.exit_code("run", exc, None)
    quiet_grpc_core()
    # Before the daemon's modules are imported, so import-time library
    # warnings already come out in the configured format.
    configure_from_settings(settings)
    try:
        from dispatchd import daemon

        return daemon.main(settings)
    except BaseException as exc:  # reported as any command's failure is
        return cli.exit_code("run", exc, settings)


if __name__ == "__main__":
    raise SystemExit(_daemon_image(sys.argv[1:]))
