"""honker: a SQLite queue with a Rust core. Here it is only reported: on this machine its
PyPI release is an sdist whose build needs a Rust toolchain and crates.io, which cannot be
reached, so ``pip install honker`` fails (no wheel for this platform)."""

from __future__ import annotations

from . import Peer, Unavailable


class HonkerPeer(Peer):
    name = "honker"
    label = "honker"
    package = "honker"

    def check(self) -> None:
        try:
            import honker  # noqa: F401
        except ImportError as exc:
            raise Unavailable(
                "honker is not installed: its PyPI release is an sdist that builds a Rust "
                "extension (maturin + crates.io), which fails on this machine; no adapter run"
            ) from exc
        raise Unavailable("honker is importable but no adapter is written for its API yet")


PEERS = {"honker": HonkerPeer}
