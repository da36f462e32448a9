"""Long natural text for fidelity tests and haystacks.

The default corpus is the Python documentation topics shipped in the standard library
(``pydoc_data.topics``, about 460K characters): always present, no download, English
prose with code. Other texts are kept for independent checks rather than tuning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from spindle_local.errors import UsageError


def pydoc_text() -> str:
    """All pydoc topics joined in a fixed (sorted) order."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))


def load_text(path: str | Path | None) -> str:
    """The text of ``path``, or the pydoc corpus when ``path`` is None."""
    if path is None:
        return pydoc_text()
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"text file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"text file is not UTF-8: {p}") from None
    if not text.strip():
        raise UsageError(f"text file is empty: {p}")
    return text


def prefix_tokens(tokenize: Callable[[str], list[int]], text: str, n: int) -> list[int]:
    """The first ``n`` tokens of ``text``, tokenizing only as long a prefix as it takes.

    A whole book costs some tokenizers minutes (SentencePiece-style vocabularies without
    pre-splitting); a prefix of about eight characters per token is enough for any real
    vocabulary, and it doubles until the tokens run past ``n`` with a margin, so the cut
    cannot change the tokens kept. Fewer than ``n`` only when the whole text has fewer.
    """
    k = 8 * n
    while True:
        toks = tokenize(text[:k])
        if len(toks) >= n + 16 or k >= len(text):
            return toks[:n]
        k *= 2
