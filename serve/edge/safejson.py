"""A JSON body parser that only ever fails with ``FieldError`` naming where the problem is.

``json.loads`` alone has sharp edges for a server: deep nesting recurses until ``RecursionError``,
huge integers cost quadratic time (or ``ValueError`` past Python's digit limit), ``NaN`` and
``1e309`` parse into values no schema expects, and invalid UTF-8 or lone surrogates survive into
strings that later fail to encode. ``parse_json`` checks all of these before or while decoding:

* not JSON (or invalid bytes outside strings) → 400, field ``body``, with line and column;
* nesting deeper than ``max_depth`` → 422, field ``body`` (found by a linear scan, no recursion);
* invalid UTF-8 or a lone surrogate in a string or key, an integer with more than
  ``max_int_digits`` digits, ``NaN``/``Infinity``/an overflowing float → 422 naming the field,
  e.g. ``metas.caption`` or ``seeds[3]``.

Messages never repeat the input.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any, Iterator, List, Tuple, Union

from serve.edge.errors import FieldError

JSON_LIMIT = 1 << 20  # bytes of JSON a route parses; upload routes add the base64 upload values to it

__all__ = ["parse_json", "check_text", "nesting_depth", "deeper_than"]

# A string token, or an unterminated one running to the end of the input: every ``"`` starts a
# match that succeeds, so stripping strings stays linear even for hostile input.
_STRING = re.compile(r'"[^"\\]*(?:\\[\s\S][^"\\]*)*(?:"|\\?\Z)')
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")
_DEPTH_STEP = [0] * 256
_DEPTH_STEP[ord("[")] = _DEPTH_STEP[ord("{")] = 1
_DEPTH_STEP[ord("]")] = _DEPTH_STEP[ord("}")] = -1
_SURROGATE = re.compile("[\ud800-\udfff]")
# A ``\uD800``-``\uDFFF`` escape; a hit only means the slower walk must look closer.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SEGMENT_MAX = 64


class _Marker:
    """Stands in for a value the decoder must not build; the walk finds where it sits."""

    def __init__(self, message: str):
        self.message = message


_LONG_INT = _Marker("integer has too many digits")
_NOT_FINITE = _Marker("must be a finite number")


def _brackets(text: str) -> bytes:
    # Bytes, so deleting everything but brackets runs in C; UTF-8 multi-byte sequences hold no
    # ASCII bytes, and "surrogatepass" lets invalid input through to be counted too.
    return _STRING.sub("", text).encode("utf-8", "surrogatepass").translate(None, _NOT_BRACKETS)


def nesting_depth(text: str) -> int:
    """The deepest ``[``/``{`` nesting of ``text``, ignoring brackets inside strings."""
    brackets = _brackets(text)
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def deeper_than(text: str, max_depth: int) -> bool:
    """Whether ``text`` nests deeper than ``max_depth``: linear, and no recursion at any depth."""
    brackets = _brackets(text)
    if brackets.count(b"[") + brackets.count(b"{") <= max_depth:
        return False
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets))) > max_depth


def check_text(field: str, value: str) -> str:
    """``value`` unless it holds a lone surrogate (invalid UTF-8 or a ``\\ud800`` escape) → 422."""
    if _SURROGATE.search(value):
        raise FieldError(field, "must be valid UTF-8 text", 422)
    return value


def parse_json(raw: Union[bytes, bytearray, memoryview, str], *, max_depth: int = 32,
               max_int_digits: int = 20) -> Any:
    """Decode ``raw`` (UTF-8 bytes or text) to Python values; see the module docstring."""
    text = bytes(raw).decode("utf-8", "surrogateescape") if not isinstance(raw, str) else raw
    if deeper_than(text, max_depth):
        raise FieldError("body", f"JSON nested deeper than {max_depth} levels", 422)
    found: List[_Marker] = []
    value = _decode(text, max_int_digits, found)
    if found or _needs_text_walk(text):
        _check_tree(value)
    return value


def _decode(text: str, max_int_digits: int, found: List[_Marker]) -> Any:
    def parse_int(digits: str):
        if len(digits) - digits.startswith("-") > max_int_digits:
            found.append(_LONG_INT)
            return _LONG_INT
        return int(digits)

    def parse_float(literal: str):
        number = float(literal)
        if math.isfinite(number):
            return number
        found.append(_NOT_FINITE)
        return _NOT_FINITE

    def parse_constant(_name: str):
        found.append(_NOT_FINITE)
        return _NOT_FINITE

    try:
        return json.loads(text, parse_int=parse_int, parse_float=parse_float, parse_constant=parse_constant)
    except json.JSONDecodeError as error:
        raise FieldError("body", f"invalid JSON: {error.msg} (line {error.lineno}, column {error.colno})",
                         400) from None
    except RecursionError:  # the depth scan should make this unreachable; never let it escape
        raise FieldError("body", "JSON nested too deeply", 422) from None


def _needs_text_walk(text: str) -> bool:
    return bool(_SURROGATE.search(text) or _SURROGATE_ESCAPE.search(text))


def _check_tree(value: Any) -> None:
    """Raise for the first bad string, key or marker in document order."""
    for path, item, is_key in _walk(value):
        if isinstance(item, _Marker):
            raise FieldError(path, item.message, 422)
        if _SURROGATE.search(item):
            message = "object key must be valid UTF-8 text" if is_key else "must be valid UTF-8 text"
            raise FieldError(path, message, 422)


def _walk(root: Any) -> Iterator[Tuple[str, Any, bool]]:
    """(field path, string or marker, is it a key) for every leaf worth checking, in order.

    Iterative, so depth costs no stack. A bad key is reported at its parent's path (or ``body``):
    the key itself is not text that can be named."""
    stack: List[Tuple[str, Any, bool]] = [("", root, False)]
    while stack:
        path, value, is_key = stack.pop()
        if is_key:
            yield path or "body", value, True
        elif isinstance(value, dict):
            children: List[Tuple[str, Any, bool]] = []
            for key, child in value.items():
                children += [(path, key, True), (_join(path, key), child, False)]
            stack.extend(reversed(children))
        elif isinstance(value, list):
            stack.extend((f"{path or 'body'}[{index}]", child, False)
                         for index, child in reversed(list(enumerate(value))))
        elif isinstance(value, (str, _Marker)):
            yield path or "body", value, False


def _join(path: str, key: str) -> str:
    segment = key if len(key) <= _SEGMENT_MAX else key[:_SEGMENT_MAX] + "…"
    return f"{path}.{segment}" if path else segment

