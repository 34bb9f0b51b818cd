"""Reading a JSON file as a stream of parser events, and saying exactly where it goes wrong.

``json.load`` holds the whole text and the whole parsed tree in memory
before the first node exists: a file of a few gigabytes cannot be imported
that way. Here the file is fed, a block at a time, to ijson's C parser
(yajl2_c, through ijson's documented push interface); its events go to
:class:`snaptree._json_stream.JsonBuilder`, which makes the nodes. What
stays in memory here is one block of text.

The events describe the tree ``json.load`` would give (a property test
checks it), with the differences yajl imposes, each an
:class:`~snaptree.InputError` with the line and column, never a silent change:
``NaN``, ``Infinity`` and ``-Infinity``, which are not JSON but which
Python's parser accepts, stop the stream with :class:`NotStreamableError`;
so does an escaped surrogate that does not pair (``"\\ud800"`` alone, or
two high halves): yajl would turn it into ``?`` or into a wrong character
without a word, so every block is checked for them first; so does a number
with an exponent of more than 18 digits (beyond ``Decimal``; Python makes
``inf`` or ``0.0`` of it). :func:`snaptree.imports.import_tree` then reads
the file whole with Python's parser (:func:`load_json`), which keeps them,
as ``snaptree import`` always did.

Numbers: integers of any size are kept exact (ijson hands yajl's digits to
``int``; its float mode would refuse integers beyond 64 bits), others
arrive as ``Decimal`` (the builder makes them ``float`` exactly as
``json.loads`` does: both round the decimal text correctly).

Errors: yajl says what is wrong, not where. On an error the file is parsed
again up to the block that failed, then byte by byte through it, which
gives the exact byte; line and column are counted from there (columns in
characters, as Python's parser counts them).
"""

from __future__ import annotations

import codecs
import decimal
import json
import re
import sys
from collections.abc import Iterator
from typing import IO, Any

import ijson

from ._compression import decompressor_error, open_for_reading
from .errors import InputError

#: Bytes read and fed to the parser at a time.
BLOCK = 256 * 1024

# A surrogate escape is only real when its backslash is not itself escaped:
# escaped backslashes are consumed in pairs, left to right, by the first branch.
_ESCAPES = re.compile(
    rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}(?:\\u[dD][c-fC-F][0-9a-fA-F]{2})?"
    rb"|\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)
_SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE_MARGIN = 11  # a high half and its low half, less the first byte


def open_json(path: str) -> _Prefixed:
    """*path* opened for streaming JSON: decompressed if zstd, positioned after a UTF-8 BOM."""
    stream = open_for_reading(path)
    try:
        head = stream.read(len(codecs.BOM_UTF8))
    except BaseException:
        stream.close()
        raise
    return _Prefixed(head.removeprefix(codecs.BOM_UTF8), stream)


class _Prefixed:
    """A binary stream with some bytes put back in front of it."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        self._head = head
        self._stream = stream

    def read(self, size: int) -> bytes:
        if self._head:
            head, self._head = self._head[:size], self._head[size:]
            return head + self._stream.read(size - len(head))
        return self._stream.read(size)

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> _Prefixed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def events(path: str, name: str) -> Iterator[list[tuple[str, Any]]]:
    """The parser's events for the JSON file *path*, a block at a time (the list is reused).

    Raises InputError naming *name* with the line and column of the first problem.
    """
    found = ijson.sendable_list()
    parser = ijson.basic_parse_coro(found)
    check = _SurrogateCheck()
    offset = 0
    nothing = True  # no event yet: an error then means the file holds no value
    with open_json(path) as stream:
        while True:
            try:
                block = stream.read(BLOCK)
            except decompressor_error() as exc:
                raise InputError(f"{name}: the zstd compression is damaged: {exc}") from None
            if not block:
                break
            bad = check.feed(block, offset)
            if bad is not None:
                raise _surrogate_error(path, name, bad)
            try:
                parser.send(block)
            except Exception as exc:
                bad = check.end()  # a lone surrogate the margin still held (yajl refuses some)
                if bad is not None:
                    raise _surrogate_error(path, name, bad) from None
                raise _parse_error(path, name, exc, offset, nothing and not found) from None
            offset += len(block)
            if found:
                nothing = False
                yield found
                del found[:]
        bad = check.end()
        if bad is not None:
            raise _surrogate_error(path, name, bad)
        try:
            parser.close()
        except Exception as exc:
            raise _parse_error(path, name, exc, offset, nothing and not found) from None
    if found:
        yield found


class _SurrogateCheck:
    """Finds escaped surrogates that do not pair, across the blocks of a stream.

    Blocks are scanned with a margin carried over, so that a pair split
    between two blocks is seen whole; the carried bytes start where no
    escape is open (after an even run of backslashes, or after a match).
    """

    def __init__(self) -> None:
        self._carry = b""
        self._carry_at = 0  # offset of the carried bytes in the stream

    def feed(self, block: bytes, offset: int) -> int | None:
        """The stream offset of a lone surrogate escape in what is known so far, or None."""
        window = self._carry + block
        start = self._carry_at
        end = len(window)
        cut = end - _SURROGATE_MARGIN
        if cut <= 0:
            self._carry = window
            return None
        run = 0
        while run < cut and window[cut - 1 - run] == 0x5C:  # backslashes just before the cut
            run += 1
        cut -= run % 2  # never carry from between an escaping backslash and what it escapes
        resume = cut
        if _SURROGATE_HINT.search(window) is not None:
            for match in _ESCAPES.finditer(window):
                text = match.group()
                if text == b"\\\\" or len(text) == 12:  # an escaped backslash, a pair
                    if match.start() < cut:
                        resume = max(resume, match.end())  # never carry half of it
                    continue
                if text[3:4] not in b"89abAB":
                    return start + match.start()  # a low half alone
                if match.end() + 6 > end:  # a high half: its low half may come next
                    resume = min(resume, match.start())
                    break
                return start + match.start()
        self._carry = window[resume:]
        self._carry_at = start + resume
        return None

    def end(self) -> int | None:
        """At the end of the stream: a lone surrogate among the bytes still carried."""
        for match in _ESCAPES.finditer(self._carry):
            text = match.group()
            if text != b"\\\\" and len(text) == 6:
                return self._carry_at + match.start()
        return None


class NotStreamableError(InputError):
    """The file holds what Python's parser reads but the stream parser cannot read faithfully.

    NaN and the infinities (not JSON, which ``json.dump`` writes and
    ``json.load`` reads back) and escaped surrogates that do not pair.
    """


def _surrogate_error(path: str, name: str, offset: int) -> NotStreamableError:
    where = position(path, offset)
    return NotStreamableError(
        f"{name}: an escaped surrogate that does not pair (\\ud800-\\udfff alone) at {where}: "
        "it is not a character, and the stream parser would change it"
    )


def _parse_error(path: str, name: str, exc: Exception, block_at: int, nothing: bool) -> InputError:
    """The InputError for a parser failure in the block fed at *block_at*.

    *nothing*: no event came before it (the file is empty, or only spaces).
    """
    digits = _long_integer(exc)
    offset = _failing_byte(path, block_at)
    token = _token_at(path, offset)
    if token:
        return NotStreamableError(
            f"{name}: {token} at {position(path, offset)} is not JSON; Python's json reads it, "
            "the stream parser does not"
        )
    if _caused_by(exc, decimal.InvalidOperation):
        return NotStreamableError(
            f"{name}: a number at {position(path, offset)} that the stream parser cannot hold "
            "(an exponent of more than 18 digits); Python's json reads it"
        )
    message = exc.args[0] if exc.args else str(exc)
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    reason = str(message).splitlines()[0].rstrip(".") if message else type(exc).__name__
    reason = reason.removeprefix("parse error: ").removeprefix("lexical error: ")
    if (
        isinstance(exc, UnicodeDecodeError)
        or "invalid bytes in UTF8" in reason
        or ("invalid char" in reason)
    ):
        # yajl sees a bad byte in a string when the string ends: name the first one
        bad = _first_not_utf8(path, offset + 4)
        if bad is not None or "invalid char" not in reason:
            at, why = bad or (offset, "not UTF-8")
            return InputError(
                f"{name}: not UTF-8 text (byte {at}: {why}); JSON must be UTF-8 (the first bad "
                f"byte is at {position(path, at)}){_wide_encoding_hint(path, at)}"
            )
    where = position(path, offset)
    if digits:
        return InputError(
            f"{name}: an integer of more than {sys.get_int_max_str_digits()} digits at {where}; "
            "Python reads longer ones only after sys.set_int_max_str_digits() is raised: "
            "store it as a string, or raise that limit"
        )
    if nothing and "premature EOF" in reason:
        reason = "the file holds no JSON value"
    return InputError(
        f"{name}: malformed JSON at {where}: {reason}{_wide_encoding_hint(path, offset)}"
    )


def _token_at(path: str, offset: int) -> str:
    """NaN, Infinity or -Infinity if it starts at *offset*, else ""."""
    with open_json(path) as stream:
        while offset > 0:
            skipped = len(stream.read(min(BLOCK, offset)))
            if not skipped:
                return ""
            offset -= skipped
        head = stream.read(9)
    for token in (b"NaN", b"Infinity", b"-Infinity"):
        if head.startswith(token):
            return token.decode()
    return ""


def _wide_encoding_hint(path: str, offset: int) -> str:
    """A hint when a failure at the start of a file looks like UTF-16 or UTF-32 text."""
    if offset >= 4:
        return ""
    with open_for_reading(path) as stream:
        head = stream.read(4)
    if b"\x00" in head or head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "; it looks like UTF-16 or UTF-32: convert it first (iconv -f UTF-16 -t UTF-8)"
    return ""


def _long_integer(exc: BaseException) -> bool:
    """Whether *exc* (or what caused it) is int() refusing a number past Python's digit limit."""
    return any(isinstance(seen, ValueError) and "digits" in str(seen) for seen in _chain(exc))


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    return any(isinstance(seen, kind) for seen in _chain(exc))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """*exc* and what caused it, in turn."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def _failing_byte(path: str, block_at: int) -> int:
    """The offset of the first byte the parser refuses, found by parsing again up to it.

    Up to the failing block in blocks, then byte by byte. yajl knows a
    number has ended only at the byte after it, so a number it refuses would
    be blamed on that byte: a space is fed after each number first (harmless
    anywhere else), and a failure then names the number itself.
    """
    parser = ijson.basic_parse_coro(ijson.sendable_list())
    offset = 0
    with open_json(path) as stream:
        while offset < block_at:
            block = stream.read(min(BLOCK, block_at - offset))
            if not block:
                return offset
            try:
                parser.send(block)
            except Exception:
                return offset  # not expected: the same bytes parsed before
            offset += len(block)
        number_at = None  # where the number being read began
        for byte in iter(lambda: stream.read(1), b""):
            if byte in _NUMBER_BYTES:
                number_at = offset if number_at is None else number_at
            elif number_at is not None:
                try:
                    parser.send(b" ")
                except Exception:
                    return number_at
                number_at = None
            try:
                parser.send(byte)
            except Exception:
                return offset
            offset += 1
            if offset - block_at > BLOCK:
                break
    return offset


_NUMBER_BYTES = frozenset(bytes([b]) for b in b"0123456789+-.eE")


def _blocks_before(path: str, limit: int) -> Iterator[bytes]:
    """The JSON text of *path* (after a BOM), a block at a time, up to byte *limit*."""
    done = 0
    with open_json(path) as stream:
        while done < limit:
            block = stream.read(min(BLOCK, limit - done))
            if not block:
                return
            done += len(block)
            yield block


def _first_not_utf8(path: str, limit: int) -> tuple[int, str] | None:
    """The offset of the first byte before *limit* that is not UTF-8, and why; None if none."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    for block in _blocks_before(path, limit):
        pending = len(decoder.getstate()[0])
        try:
            decoder.decode(block)
        except UnicodeDecodeError as exc:
            return offset - pending + exc.start, exc.reason
        offset += len(block)
    return None


def position(path: str, offset: int) -> str:
    """ "line L, column C" of the byte at *offset* (columns in characters, from 1)."""
    line, column = 1, 0
    for block in _blocks_before(path, offset):
        newlines = block.count(b"\n")
        if newlines:
            line += newlines
            block = block[block.rindex(b"\n") + 1 :]
            column = 0
        # characters: every byte but UTF-8 continuation bytes starts one
        column += len(block) - len(block.translate(None, delete=_ASCII_AND_LEADS))
    return f"line {line}, column {column + 1}"


_ASCII_AND_LEADS = bytes(b for b in range(256) if not 0x80 <= b < 0xC0)


def _long_int_position(raw: bytes, digits: int) -> str:
    """Where the first integer of more than *digits* digits is in JSON text: "line L, column C"."""
    found = re.search(rb"(?<![\w.\"\\-])-?\d{%d,}" % (digits + 1), raw)
    if found is None:
        return ""
    start = found.start()
    line = raw.count(b"\n", 0, start) + 1
    column = len(raw[raw.rfind(b"\n", 0, start) + 1 : start].decode("utf-8", "replace")) + 1
    return f" at line {line}, column {column}"


def load_json(raw: bytes, source: str) -> Any:
    """*raw* JSON text parsed whole by Python's parser (for ``load_source``), or InputError."""
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{source}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{source}: not UTF-8 text (byte {exc.start}: {exc.reason}); JSON must be UTF-8"
        ) from None
    except RecursionError:
        raise InputError(
            f"{source}: the JSON is nested too deeply for Python's JSON parser"
        ) from None
    except ValueError:
        # int() refusing a number longer than sys.get_int_max_str_digits(), the
        # one ValueError json.loads lets through without a position.
        limit = sys.get_int_max_str_digits()
        raise InputError(
            f"{source}: an integer of more than {limit} digits"
            f"{_long_int_position(raw, limit)}; Python reads longer ones only after "
            "sys.set_int_max_str_digits() is raised: store it as a string, or raise that limit"
        ) from None
