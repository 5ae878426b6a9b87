"""Parse and format byte sizes for the magics (``SIZE`` in docs/interface.md).

Units come from humanfriendly: decimal (``500MB``, ``1.5G``, ``800M``) and binary
(``2GiB``), as documented at https://humanfriendly.readthedocs.io (``parse_size``). A plain
number is bytes (``1e9`` too), and ``25%`` is a share of the effective limit.
"""

import math

import humanfriendly

EXAMPLE = "500MB, 2GiB, 1.5G, 800M, 1e9 or 25%"
# Larger budgets are surely typos: 2**60 bytes is an exbibyte.
MAX_BYTES = 2**60


def parse_size(text, limit_bytes):
    """Return ``text`` as a positive whole number of bytes.

    ``limit_bytes`` (int, bytes) is the effective limit that a percentage refers to.
    Raises ``ValueError`` with a message that shows accepted examples when ``text`` is
    empty, not ASCII, not a size, zero, negative, not finite, or above 2**60 bytes.
    """
    raw = (text or "").strip()
    if not raw:
        raise ValueError(f"a size is required, e.g. {EXAMPLE}")
    if not raw.isascii():
        # float() and humanfriendly accept other scripts' digits (e.g. fullwidth); a size
        # typed that way is more likely a paste accident than intended.
        raise ValueError(f"{raw!r} is not a size (use ASCII digits and units), e.g. {EXAMPLE}")
    try:
        if raw.endswith("%"):
            value = float(raw[:-1]) / 100.0 * limit_bytes
        else:
            try:
                value = float(raw)
            except ValueError:
                value = float(humanfriendly.parse_size(raw))
    except (ValueError, humanfriendly.InvalidSize):
        raise ValueError(f"{raw!r} is not a size; use e.g. {EXAMPLE}") from None
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{raw!r} must be a positive size, e.g. {EXAMPLE}")
    if value > MAX_BYTES:
        raise ValueError(f"{raw!r} is larger than any machine's memory; use e.g. {EXAMPLE}")
    return int(value)


def format_size(n):
    """``n`` bytes (int) as text with decimal units, e.g. ``'384 MB'``, the units users type
    budgets in; negatives keep their sign."""
    if n is None:
        return "n/a"
    sign = "-" if n < 0 else ""
    return sign + humanfriendly.format_size(abs(int(n)))


def format_blocks(count):
    """A block count (int) as text with its noun, e.g. ``'1 block'``, ``'1,200 blocks'``."""
    return f"{count:,} block{'' if count == 1 else 's'}"
