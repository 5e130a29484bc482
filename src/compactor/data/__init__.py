"""Text -> token windows with recorded provenance.

``load_text(spec)`` accepts a corpus split (``austen:eval``) or a path to user text;
``make_windows(tokenizer, text, ...)`` cuts it into fixed windows.
"""

from compactor.data.sources import Text, load_text
from compactor.data.windows import TokenWindows, make_windows, windows_for

__all__ = ["Text", "TokenWindows", "load_text", "make_windows", "windows_for"]
