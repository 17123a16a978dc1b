"""Text from a run log, made safe to show: the one place that says how (standard library only).

A run directory holds text that somebody else chose: module and layer names, op names, source
lines, file and folder names, a clipper's label. Printed as it is, an ANSI/OSC escape sequence in
such a name clears the screen, sets the window title or hides text, and a Rich markup tag
(``[bold]``, ``[/x]``) breaks or rewrites a Rich console's output. :func:`safe_text` escapes every
control character visibly (ESC becomes the four characters ``\\x1b``), so the text is shown
literally; the command line, the terminal summary and the HTML report pass all such text through
it, and print it without markup.

Example:
    >>> safe_text("layer\\x1b]0;pwned\\x07")
    'layer\\\\x1b]0;pwned\\\\x07'
    >>> safe_text("run[/x]")  # markup is not this function's business: print without markup
    'run[/x]'
"""

from __future__ import annotations

__all__ = ["safe_text"]

_BIDI = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_LINES = (0x2028, 0x2029)  # line and paragraph separators: a line break some terminals honour

# C0 controls (newline and tab included: a name never holds one), DEL, C1 controls (CSI, OSC, ...
# on terminals that read them), and the bidirectional overrides that reorder what is shown.
_ESCAPES: dict[int, str] = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))},
    **{c: f"\\u{c:04x}" for c in (*_BIDI, *_LINES)},
}


def safe_text(value: object) -> str:
    """``str(value)`` with every control character escaped visibly (``\\x1b``, ``\\u202e``).

    Escaped: the C0 controls (ESC, BEL, backspace, carriage return, newline, tab, ...), DEL, the
    C1 controls (U+0080–U+009F), the Unicode line/paragraph separators and the bidirectional
    overrides and isolates. Everything else, non-ASCII text included, is kept as it is.

    Args:
        value: any value; usually a name or a message built from one.
    """
    return str(value).translate(_ESCAPES)
