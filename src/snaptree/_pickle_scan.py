"""Reading an untrusted pickle's opcodes before the C unpickler runs them.

``find_class`` keeps a pickle from calling code (see :mod:`snaptree._unpickler`),
but two things the C unpickler does with plain data can take a process
down, whatever the allow-list says:

- a memo index far past anything stored (``LONG_BINPUT 2**27``: 9 bytes of
  file) makes it allocate and zero a memo table of twice that many
  pointers, 2 GB; near 2**32 the machine runs out of memory;
- a tuple nested a million deep, used as a dict key or set element, is
  hashed recursively in C, with no recursion check: the process dies with
  a segmentation fault;
- a few dozen tuples that each hold the previous one twice (memo GETs):
  hashing the last visits 2**K tuples, so a few hundred bytes hang the
  process, and a dump, which writes tuples out in full, would never end.

So the unpickler reads through :class:`ScanningReader`, which hands it no
byte that :class:`OpcodeScan` has not checked first: the scan follows the
pickle machine's stack (the *hash depth* of each value on it: how deep a
hash of it can recurse) and its memo, and refuses a memo index more than
:data:`MEMO_SLACK` past the entries stored so far, or a value whose hash
would recurse more than :data:`MAX_HASH_DEPTH` levels, or whose hash would
visit more values than :func:`max_hash_size` allows for the bytes read so
far (its *size*: itself and every value in it, each time it is reached),
or keys and set elements stored whose sizes add up to more than that (the
same large tuple hashed again and again, a few bytes each time; see
:meth:`OpcodeScan.charge`).
Lists, dicts and sets cannot be hashed, so they stop the count (a tree of
dicts may be as deep and as wide as it likes). What a *call* makes of them may be hashable
(``tuple([x])`` wraps the list's items): the unpickler measures the tuples
that ``tuple`` and ``copyreg._reconstructor`` return as they return
(``_unpickler._TupleDepths``), so a hash recurses at most twice the limit
(a measured tuple inside tuples the scan counted). Every legitimate
pickler numbers its memo from 0 and cannot pickle a tuple nested that
deep (it recurses itself), and a value's size is at most the bytes that
wrote it unless it holds the same tuple many times, so no real file is
refused.

The scan must read the opcodes exactly as the C unpickler will, or it
checks a different program: MEMOIZE stores at the number of entries
stored (not after the highest index), and an opcode may not run past the
end of its FRAME (the C unpickler reads a large frame whole and the rest
of such an opcode afresh after it; picklers never cut one).

The scan costs a pass over the opcodes in Python, about half a microsecond
each: a few per object, small beside what an import does with each object
(docs/import.md). The C unpickler still does the loading.
"""

from __future__ import annotations

import pickle
import pickletools
from array import array
from typing import Any

from .errors import InputError

#: Deepest a value's hash may recurse (tuples in tuples). Twice this (see above) is 10,000
#: levels: about 0.8 MB of C stack, where a thread's 8 MB gave out near 200,000.
MAX_HASH_DEPTH = 5_000
#: How far a memo index may run ahead of the entries stored so far (a real pickle's never does).
MEMO_SLACK = 100_000
#: A value's size (see max_hash_size) may be this many times the bytes read so far ...
HASH_SIZE_PER_BYTE = 1024
#: ... or this many values, whichever is more: about 0.4 s of hashing in C.
MIN_HASH_SIZE = 1 << 24

# Each value on the scan's stack, and in its memo, is one int: its size (how many values
# a hash of it visits, saturated at _SIZE_CAP) above its depth (below MAX_HASH_DEPTH < 2**13).
_SHIFT = 13
_DEPTH = (1 << _SHIFT) - 1
_ONE = 1 << _SHIFT  # a value that holds no other: size 1, depth 0
_SIZE_CAP = 1 << 40


# What an opcode hashes, charged to the scan's budget of hashing work (see OpcodeScan.charge):
_HASHES_NOTHING, _HASHES_KEY, _HASHES_KEYS, _HASHES_ITEMS = range(4)
_HASHING = {
    "SETITEM": _HASHES_KEY,  # the key below the value on top
    "SETITEMS": _HASHES_KEYS,  # every other value above the mark, from the first
    "DICT": _HASHES_KEYS,
    "ADDITEMS": _HASHES_ITEMS,  # every value above the mark
    "FROZENSET": _HASHES_ITEMS,
}


def max_hash_size(offset: int) -> int:
    """The largest size a value made at byte *offset* of a pickle may have.

    Without repeats a value's size is at most the bytes that wrote it (each
    value is an opcode); holding the same tuple again through the memo adds
    its size again for a few bytes. Real pickles repeat tuples too (20,000
    references to one 100-tuple: 2 million values in 60 KB), so the bound is
    generous: it is there for the tuples that each hold the previous one
    twice, whose size doubles with every few bytes, and it keeps what one
    hash of a value can cost in proportion to the file. A value hashed again
    and again (the same key in many dicts) is not bounded by it.
    """
    return max(MIN_HASH_SIZE, HASH_SIZE_PER_BYTE * offset)


#: Bytes read from the file at a time.
_CHUNK = 1 << 16

# What each opcode does to the stack, as the scan follows it.
(
    _PUSH,  # pushes a value that cannot recurse: a scalar, an empty container, a global
    _TUPLE_N,  # pops N values, pushes a tuple of them (EMPTY_TUPLE, TUPLE1..3)
    _TO_MARK,  # pops back to the mark, pushes a container of them (TUPLE, FROZENSET; OBJ, INST)
    _MUTABLE_TO_MARK,  # pops back to the mark, pushes an unhashable container (LIST, DICT)
    _INTO_TO_MARK,  # pops back to the mark into the container below it (APPENDS, SETITEMS...)
    _INTO,  # pops N values into the container below them (APPEND, SETITEM)
    _CALL,  # pops N values, pushes what calling the first with the rest made (REDUCE...)
    _BUILD,  # pops a state into the object below it
    _POP,
    _POP_MARK,
    _DUP,
    _MARK,
    _PUT,
    _MEMOIZE,
    _GET,
    _REPLACE,  # pops N values, pushes one that cannot recurse (STACK_GLOBAL, BINPERSID)
    _NOTHING,  # PROTO, FRAME, READONLY_BUFFER
    _STOP,
) = range(18)

_EFFECTS: dict[str, tuple[int, int]] = {
    "EMPTY_TUPLE": (_TUPLE_N, 0),
    "TUPLE1": (_TUPLE_N, 1),
    "TUPLE2": (_TUPLE_N, 2),
    "TUPLE3": (_TUPLE_N, 3),
    "TUPLE": (_TO_MARK, 0),
    "FROZENSET": (_TO_MARK, 0),
    "OBJ": (_TO_MARK, 0),
    "INST": (_TO_MARK, 0),
    "LIST": (_MUTABLE_TO_MARK, 0),
    "DICT": (_MUTABLE_TO_MARK, 0),
    "APPENDS": (_INTO_TO_MARK, 0),
    "SETITEMS": (_INTO_TO_MARK, 0),
    "ADDITEMS": (_INTO_TO_MARK, 0),
    "APPEND": (_INTO, 1),
    "SETITEM": (_INTO, 2),
    "REDUCE": (_CALL, 2),
    "NEWOBJ": (_CALL, 2),
    "NEWOBJ_EX": (_CALL, 3),
    "BUILD": (_BUILD, 0),
    "POP": (_POP, 0),
    "POP_MARK": (_POP_MARK, 0),
    "DUP": (_DUP, 0),
    "MARK": (_MARK, 0),
    "PUT": (_PUT, 0),
    "BINPUT": (_PUT, 0),
    "LONG_BINPUT": (_PUT, 0),
    "MEMOIZE": (_MEMOIZE, 0),
    "GET": (_GET, 0),
    "BINGET": (_GET, 0),
    "LONG_BINGET": (_GET, 0),
    "STACK_GLOBAL": (_REPLACE, 2),
    "BINPERSID": (_REPLACE, 1),
    "PROTO": (_NOTHING, 0),
    "FRAME": (_NOTHING, 0),
    "READONLY_BUFFER": (_NOTHING, 0),
    "STOP": (_STOP, 0),
}

# How each opcode's argument is laid out (pickletools' descriptors).
_FIXED, _LINE, _TWO_LINES, _SIZED = range(4)
_SIZE_BYTES = {
    pickletools.TAKEN_FROM_ARGUMENT1: (1, False),
    pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, False),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, False),
}


def _table() -> list[Any]:
    """Per opcode byte: how to skip its argument, and its effect; None: no such opcode.

    ``(layout, width, signed, effect, count, hashes)``: one lookup per opcode.
    """
    table: list[Any] = [None] * 256
    for op in pickletools.opcodes:
        effect, count = _EFFECTS.get(op.name, (_PUSH, 0))
        hashes = _HASHING.get(op.name, _HASHES_NOTHING)
        arg = op.arg
        if arg is None:
            layout, width, signed = _FIXED, 0, False
        elif arg.n >= 0:
            layout, width, signed = _FIXED, arg.n, False
        elif arg.n == pickletools.UP_TO_NEWLINE:
            layout, width, signed = (
                _TWO_LINES if op.name in ("GLOBAL", "INST") else _LINE,
                0,
                False,
            )
        else:
            layout = _SIZED
            width, signed = _SIZE_BYTES[arg.n]
        table[ord(op.code)] = (layout, width, signed, effect, count, hashes)
    return table


_OPCODES = _table()
_FRAME = pickle.FRAME[0]


class OpcodeScan:
    """Follows *pickles* pickles of a stream (one after another, sharing a memo), chunk by chunk.

    :meth:`feed` takes the next bytes and raises InputError at the first
    opcode the unpickler must not run; bytes of an opcode cut off at the
    end of a chunk wait for the next one. Bytes after the last pickle are
    not looked at: the unpickler stops before them, and what they are is
    its caller's to judge (load_pickle refuses them with a message of its own).
    """

    def __init__(self, source: str, pickles: int) -> None:
        self._source = source
        self._pickles = pickles  # still to scan: the bytes after them are not unpickled
        self._pending = bytearray()  # the start of an opcode the last chunk cut off
        self._resume: tuple[int, int] | None = None  # its line search: from where, lines found
        self._skip = 0  # bytes of a long argument still to come
        self._offset = 0  # of the first byte of _pending in the stream
        self._stack: list[int] = []  # the size and depth of each value on the machine's stack
        self._marks: list[int] = []  # stack lengths at each MARK
        self._memo = array("Q")  # 1 + the size and depth of each memo entry; 0: never stored
        self._filled = 0  # memo entries stored: where MEMOIZE stores next, as in the unpickler
        self._frame_end = -1  # stream offset where the current FRAME ends (-1: none)
        self._hashed = 0  # hashing work so far: the sizes of the keys and elements stored
        self._fed = 0  # bytes of the stream given to feed so far

    def feed(self, data: bytes) -> None:
        self._fed += len(data)
        if not self._pickles:
            return
        if self._skip:
            taken = min(self._skip, len(data))
            self._skip -= taken
            self._offset += taken
            data = data[taken:]
            if not data:
                return
        if self._pending:
            # In place: a long line arriving a chunk at a time is not copied again each time.
            self._pending += data
            buf: bytes | bytearray = self._pending
        else:
            buf = data
        end = len(buf)
        offset = self._offset  # of buf[0] in the stream
        frame_end = self._frame_end
        resume = self._resume  # the cut-off opcode's line search, where it got to
        self._resume = None
        pos = 0
        stack = self._stack
        marks = self._marks
        memo = self._memo
        try:
            while pos < end:
                start = pos
                code = buf[pos]
                opcode = _OPCODES[code]
                if opcode is None:
                    self._malformed(start, f"unknown opcode {bytes([code])!r}")
                layout, width, signed, effect, _, _ = opcode
                pos += 1
                arg_at = pos
                if layout == _FIXED:
                    pos += width
                elif layout == _SIZED:
                    if pos + width > end:
                        break
                    if width == 1:
                        size = buf[pos]
                    else:
                        size = int.from_bytes(buf[pos : pos + width], "little", signed=signed)
                        if size < 0:
                            self._malformed(start, "a negative length")
                    pos += width + size
                else:  # one line, or two (GLOBAL, INST)
                    lines = 2 if layout == _TWO_LINES else 1
                    search, found = (pos, 0) if resume is None or start else resume
                    while found < lines:
                        newline = buf.find(b"\n", search)
                        if newline < 0:
                            break
                        found += 1
                        search = newline + 1
                    if found < lines:
                        self._resume = (end - start, found)  # relative to the cut-off opcode
                        break
                    pos = search
                if pos > end and layout != _SIZED:
                    break
                if frame_end >= 0:
                    # The C unpickler reads a large frame whole and reads the rest of an
                    # opcode cut by its end afresh after it: it would not run what the
                    # scan follows. Picklers never cut an opcode with a frame's end.
                    if offset + start >= frame_end:
                        frame_end = -1
                    elif offset + pos > frame_end:
                        self._malformed(start, "an opcode runs past the end of its frame")
                if code == _FRAME:
                    if frame_end >= 0:
                        self._malformed(start, "a frame inside a frame")
                    frame_end = offset + pos + int.from_bytes(buf[arg_at:pos], "little")
                if pos > end:
                    # A long str, bytes or int: its effect needs none of its bytes, so
                    # they are skipped as they come rather than gathered.
                    self._step(code, buf, arg_at, start)
                    self._skip = pos - end
                    self._pending = bytearray()
                    self._offset += end
                    return
                # The opcodes most pickles are made of, here rather than in _step.
                if effect == _PUSH:
                    stack.append(_ONE)
                elif effect == _MARK:
                    marks.append(len(stack))
                elif (
                    effect == _MEMOIZE
                    and self._filled == len(memo)  # no gaps: it stores at the end
                    and len(stack) > (marks[-1] if marks else 0)
                ):
                    memo.append(1 + stack[-1])
                    self._filled += 1
                elif effect == _GET and layout == _FIXED:
                    index = buf[arg_at] if width == 1 else int.from_bytes(buf[arg_at:pos], "little")
                    stored = memo[index] if index < len(memo) else 0
                    if not stored:
                        self._malformed(start, f"memo index {index:,} was never stored")
                    stack.append(stored - 1)
                else:
                    self._step(code, buf, arg_at, start)
                    if effect == _STOP:  # _step replaced the stack and marks
                        if not self._pickles:
                            return
                        stack = self._stack
                        marks = self._marks
            else:
                self._pending = bytearray()
                self._offset += end
                return
            if start or buf is not self._pending:
                self._pending = bytearray(buf[start:])
            self._offset += start
        finally:
            self._frame_end = frame_end

    def _refuse(self, at: int, why: str) -> None:
        """A pickle that is valid, but that the unpickler must not be given."""
        raise InputError(
            f"{self._source}: refused at byte {self._offset + at:,}: {why}; nothing was loaded"
        )

    def _malformed(self, at: int, why: str) -> None:
        """What the unpickler would fail on too: said before it gets there."""
        raise InputError(f"{self._source}: not a valid pickle: {why} at byte {self._offset + at:,}")

    def _step(self, code: int, buf: bytes, arg_at: int, start: int) -> None:
        """Follow one opcode's effect on the stack and the memo (MARK: see :meth:`feed`)."""
        _, _, _, effect, count, hashes = _OPCODES[code]
        stack = self._stack
        fence = self._marks[-1] if self._marks else 0
        if effect == _PUSH:
            stack.append(_ONE)
        elif effect in (_TUPLE_N, _CALL):
            if len(stack) - count < fence:
                self._malformed(start, "the stack underflows")
            self._wrap(stack[len(stack) - count :], start)
        elif effect in (_TO_MARK, _MUTABLE_TO_MARK, _POP_MARK):
            if not self._marks:
                self._malformed(start, "no MARK to pop back to")
            if hashes:  # FROZENSET, DICT
                self._charge_above(self._marks[-1], hashes, start)
            mark = self._marks.pop()
            if effect == _TO_MARK:
                self._wrap(stack[mark:], start, mark)
            else:
                del stack[mark:]
                if effect == _MUTABLE_TO_MARK:
                    stack.append(_ONE)
        elif effect == _INTO_TO_MARK:
            if not self._marks:
                self._malformed(start, "no MARK to pop back to")
            if hashes:  # SETITEMS, ADDITEMS (not APPENDS)
                self._charge_above(self._marks[-1], hashes, start)
            mark = self._marks.pop()
            del stack[mark:]
            if not stack:
                self._malformed(start, "the stack underflows")
        elif effect == _INTO:
            if len(stack) - count < max(fence, 1):
                self._malformed(start, "the stack underflows")
            if hashes:  # SETITEM: its key
                self.charge(stack[-2] >> _SHIFT, start)
            del stack[len(stack) - count :]
        elif effect == _BUILD:
            if len(stack) - 2 < fence:
                self._malformed(start, "the stack underflows")
            state = stack.pop()
            built = stack.pop()
            self._push(
                max(built & _DEPTH, 1 + (state & _DEPTH)),
                (built >> _SHIFT) + (state >> _SHIFT),
                start,
            )
        elif effect == _POP:
            if self._marks and self._marks[-1] == len(stack):
                self._marks.pop()
            elif len(stack) <= fence:
                self._malformed(start, "the stack underflows")
            else:
                stack.pop()
        elif effect == _DUP:
            if len(stack) <= fence:
                self._malformed(start, "the stack underflows")
            stack.append(stack[-1])
        elif effect in (_PUT, _MEMOIZE):
            if len(stack) <= fence:
                self._malformed(start, "the stack underflows")
            memo = self._memo
            # MEMOIZE stores at the number of entries stored, as the C unpickler does
            # (not at the highest index + 1); the bound counts entries, not bytes.
            index = self._filled if effect == _MEMOIZE else self._index(code, buf, arg_at, start)
            if index < 0:
                self._malformed(start, "a negative memo index")
            if index > self._filled + MEMO_SLACK:
                self._refuse(
                    start,
                    f"memo index {index:,} with {self._filled:,} entries stored (a pickler "
                    "numbers its memo from 0; this would make the unpickler allocate memory "
                    "for every index up to it)",
                )
            if index >= len(memo):
                memo.frombytes(bytes(memo.itemsize * (index + 1 - len(memo))))
            if not memo[index]:
                self._filled += 1
            memo[index] = 1 + stack[-1]
        elif effect == _GET:
            index = self._index(code, buf, arg_at, start)
            if not 0 <= index < len(self._memo) or not self._memo[index]:
                self._malformed(start, f"memo index {index:,} was never stored")
            stack.append(self._memo[index] - 1)
        elif effect == _REPLACE:
            if len(stack) - count < fence:
                self._malformed(start, "the stack underflows")
            del stack[len(stack) - count :]
            stack.append(_ONE)
        elif effect == _STOP:
            # The next pickle of the stream starts with an empty stack (the memo stays).
            self._stack = []
            self._marks = []
            self._pickles -= 1

    def _charge_above(self, mark: int, hashes: int, start: int) -> None:
        """Charge the keys (every other value) or items above *mark* that an opcode stores.

        The depths below each size add less than one per value to the sum:
        the budget rounds up, by less than a value per key.
        """
        held = self._stack[mark::2] if hashes == _HASHES_KEYS else self._stack[mark:]
        self.charge(sum(held) >> _SHIFT, start)

    def charge(self, work: int, start: int | None = None) -> None:
        """Add *work* values hashed (keys and elements stored, by their sizes) to the budget.

        Each size is bounded on its own (see max_hash_size), but the same
        large tuple can be hashed again and again: as a key in thousands of
        dicts, as each of a list's items when ``set(a_list)`` is called, a
        few bytes of file each. The budget for all of them together is what
        one value may have (max_hash_size): real pickles hash about one
        value per key or element they store, far below it. *start*: where
        in the current chunk the opcode that hashes starts (None: a call the
        unpickler makes, behind the scan, bounded by all the bytes fed so far).
        """
        self._hashed += work
        if self._hashed <= MIN_HASH_SIZE:  # the common case: nothing more to look at
            return
        at = self._offset + start if start is not None else self._fed
        if self._hashed > max_hash_size(at):
            raise InputError(
                f"{self._source}: refused {'at' if start is not None else 'by'} byte {at:,}: "
                f"hashing its keys and set elements would visit {self._hashed:,} values "
                "counting repeats (the same tuple stored again and again as a key or "
                "element, through the memo), far more than the file's size accounts for: "
                "it would take as long; nothing was loaded"
            )

    def _wrap(self, held: list[int], start: int, at: int | None = None) -> None:
        """Replace the values *held* (the top of the stack, from *at*) with one holding them."""
        if len(held) == 1:  # TUPLE1, and the argument tuples of most calls: kept quick
            (code,) = held
            depth, size = 1 + (code & _DEPTH), 1 + (code >> _SHIFT)
        else:
            depths = list(map(_DEPTH.__and__, held))  # in C
            depth = 1 + max(depths, default=0)
            size = 1 + ((sum(held) - sum(depths)) >> _SHIFT)
        del self._stack[len(self._stack) - len(held) if at is None else at :]
        self._push(depth, size, start)

    def _push(self, depth: int, size: int, start: int) -> None:
        if depth > MAX_HASH_DEPTH:
            self._refuse(
                start,
                f"tuples (or objects) nested more than {MAX_HASH_DEPTH:,} levels deep, which "
                "hashing as a dict key or set element would follow in C until the process "
                "crashed",
            )
        if size > MIN_HASH_SIZE and size > max_hash_size(self._offset + start):
            self._refuse(start, too_large(size))
        self._stack.append(min(size, _SIZE_CAP) << _SHIFT | depth)

    @property
    def offset(self) -> int:
        """How many bytes of the stream the scan has gone past."""
        return self._offset

    def _index(self, code: int, buf: bytes, arg_at: int, start: int) -> int:
        layout, width, _, _, _, _ = _OPCODES[code]
        if layout == _FIXED:
            return int.from_bytes(buf[arg_at : arg_at + width], "little")
        text = buf[arg_at : buf.index(b"\n", arg_at)]
        try:
            return int(text)
        except ValueError:
            self._malformed(start, f"memo index {text[:20]!r} is not a number")
            raise  # not reached


def too_large(size: int) -> str:
    """Why a value of *size* values is refused (see max_hash_size)."""
    return (
        f"a tuple (or object) that holds {size:,} values counting repeats (the same tuple "
        "held again and again, through the memo), far more than the file's size accounts "
        "for: hashing it as a dict key, or writing it out in a dump, would take as long"
    )


class ScanningReader:
    """A file the unpickler reads through, handed only bytes the scan has checked.

    ``peek`` lets the C unpickler read ahead in large blocks, as it does on a
    real file: every block is scanned when it is first handed over. The
    buffer is a bytearray consumed from the front (which CPython does without
    moving the rest), and ``readline`` searches only what it has not searched,
    so that a line of a gigabyte costs a pass, not one per chunk.
    """

    def __init__(self, file: Any, source: str, pickles: int) -> None:
        self._file = file
        self._scan = OpcodeScan(source, pickles)
        self._buffer = bytearray()  # scanned, not yet consumed

    def offset(self) -> int:
        """How many bytes of the file have been scanned (handed over or not)."""
        return self._scan.offset

    def charge(self, work: int) -> None:
        """Hashing a call is about to do (``set(a_list)``): see OpcodeScan.charge."""
        self._scan.charge(work)

    def _more(self, wanted: int = _CHUNK) -> bool:
        """Read, scan and buffer the next bytes of the file; False at its end."""
        data = self._file.read(max(_CHUNK, wanted))
        if not data:  # a pickle cut short is the unpickler's to report
            return False
        self._scan.feed(data)
        self._buffer += data
        return True

    def _fill(self, wanted: int) -> None:
        while len(self._buffer) < wanted and self._more(wanted - len(self._buffer)):
            pass

    def peek(self, size: int = 1) -> bytes:
        self._fill(max(size, 1))
        return bytes(self._buffer)  # a copy: the unpickler holds on to what it is given

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            while self._more():
                pass
            size = len(self._buffer)
        else:
            self._fill(size)
        taken = bytes(self._buffer[:size])
        del self._buffer[:size]
        return taken

    def readinto(self, target: Any) -> int:
        data = self.read(len(target))
        target[: len(data)] = data
        return len(data)

    def readline(self) -> bytes:
        searched = 0
        while True:
            newline = self._buffer.find(b"\n", searched)
            if newline >= 0:
                return self.read(newline + 1)
            searched = len(self._buffer)
            if not self._more():
                return self.read()
