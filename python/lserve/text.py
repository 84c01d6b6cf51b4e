"""Text that may cross into the tokenizer and back out in a response must be valid Unicode.

JSON can carry a lone surrogate ("\\ud800"); Python keeps it in a str, but neither the Rust tokenizer
nor a UTF-8 response body can take it. check_text refuses such text with a ValueError naming the field.
"""
from __future__ import annotations


def check_text(text: str, name: str) -> None:
    """Raises ValueError naming `name` when text cannot be encoded as UTF-8.

    Example:
        >>> check_text("caf\\u00e9", "prompt")      # fine
        >>> check_text("x\\ud800", "prompt")        # ValueError: prompt is not valid Unicode: ...
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{name} is not valid Unicode: {error.reason} at character {error.start} "
                         f"({text[error.start]!r})") from None
