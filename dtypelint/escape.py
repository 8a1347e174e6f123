"""Text from the user's model, made safe for where it is shown or written.

Module, parameter and buffer names are any string ``nn.Module`` accepts, messages quote exceptions and op
names of the model's code, and a checkpoint path may hold bytes that are not UTF-8 (``os.fsdecode`` turns
them into lone surrogates). A character that could act instead of being read is replaced by the escape
Python's ``repr`` shows for it (``\\x1b``, ``\\n``, ``\\u202e``, ``\\udcff``), so the reader sees that it
is there. Backslashes themselves are left as they are: a name is shown, not parsed back.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import fields, is_dataclass, replace
from pathlib import PurePath
from typing import Any, TypeVar

Value = TypeVar("Value")

# Lone surrogates: what os.fsdecode makes of bytes that are not UTF-8; no UTF-8 text can hold them.
_SURROGATES = re.compile("[\ud800-\udfff]")
# What XML 1.0 forbids (its ``Char`` production: most C0 controls, surrogates, U+FFFE and U+FFFF), and CR,
# which every XML parser reads back as LF.
_NOT_XML = re.compile("[^\t\n\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _visible(char: str) -> str:
    """The escape ``repr`` shows for a character: ``\\x1b``, ``\\n``, ``\\u202e``."""
    return repr(char)[1:-1]


def printable(text: str) -> str:
    """``text`` for a terminal or a page: every character ``str.isprintable`` rejects (controls, ESC and
    BEL of terminal sequences, newlines, DEL, C1, line and paragraph separators, bidi overrides and other
    format characters, surrogates, unassigned code points, spaces other than U+0020) shown escaped."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _visible(char) for char in text)


def unicode_text(text: str) -> str:
    """``text`` that encodes to UTF-8: lone surrogates shown escaped, everything else kept."""
    return _SURROGATES.sub(lambda match: _visible(match.group()), text)


def xml_text(text: str) -> str:
    """``text`` that XML 1.0 holds and reads back as it is: the characters it forbids, and CR, shown escaped;
    everything else kept."""
    return _NOT_XML.sub(lambda match: _visible(match.group()), text)


def map_text(value: Value, change: Callable[[str], str]) -> Value:
    """A copy of ``value`` with ``change`` applied to every text in it: strings, paths, and those in lists,
    tuples, dicts and dataclass fields. Fields hidden from ``repr`` are context, never shown (a report's
    settings, inputs and dtype census), and stay as they are; so does any other object (the graph)."""
    result: Any = value
    if isinstance(value, str):
        result = change(value)
    elif isinstance(value, PurePath):
        result = type(value)(change(str(value)))
    elif isinstance(value, list):
        result = [map_text(item, change) for item in value]
    elif isinstance(value, tuple):
        result = tuple(map_text(item, change) for item in value)
    elif isinstance(value, dict):
        result = {map_text(key, change): map_text(item, change) for key, item in value.items()}
    elif is_dataclass(value) and not isinstance(value, type):
        result = replace(value, **{field.name: map_text(getattr(value, field.name), change)
                                   for field in fields(value) if field.init and field.repr})
    return result
