# Token sets and token maps whose size follows the gaps in a vCPU's tokens, not their number.
#
# alloc_apf_token hands a vCPU's ids out one after another (`vcpu->arch.apf.id++ << 12 | vcpu_id`), so the tokens a
# checker has seen, or has seen get their page-ready, are a few runs of consecutive ids however long the log: a
# set of them held as runs is bounded by the tokens still live (and those dropped without a page-ready), which is
# what lets `apf-emu check` read a long chaos run's logs in constant memory. A token that is not (id << 12) | vcpu
# of its vCPU (malformed: a violation already) is kept apart, one by one.
#
# Hand-written over bisect rather than taken from an interval library (portion, intervaltree): the checker adds one
# token per event, and the common case, the next id after the last run, must cost a comparison and a store.
from __future__ import annotations

from bisect import bisect_right
from typing import Any, Generic, TypeVar

from shared.abi import TOKEN_VCPU_BITS

V = TypeVar("V")
_VCPU_MASK = (1 << TOKEN_VCPU_BITS) - 1


def _integral(x: Any) -> Any:
    """x as an int if a set or dict would take it for one (True is 1, 4097.0 is 4097), else x."""
    if type(x) is not int and isinstance(x, (bool, float)) and x == x and float(x).is_integer():
        return int(x)
    return x


def _same(a: Any, b: Any) -> bool:
    """Values one run can hold: equal and of one type (boot 1 and boot 1.0 print differently)."""
    return type(a) is type(b) and a == b


class IdRuns:
    """A set of ints held as sorted, disjoint, non-adjacent runs [lo, hi]."""

    __slots__ = ("_hi", "_lo")

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []

    def __contains__(self, x: int) -> bool:
        i = bisect_right(self._lo, x) - 1
        return i >= 0 and x <= self._hi[i]

    def add(self, x: int) -> None:
        lo, hi = self._lo, self._hi
        if hi and x == hi[-1] + 1:  # the next id: the common case
            hi[-1] = x
            return
        i = bisect_right(lo, x) - 1
        if i >= 0 and x <= hi[i]:
            return
        left = i >= 0 and hi[i] == x - 1
        right = i + 1 < len(lo) and lo[i + 1] == x + 1
        if left and right:
            hi[i] = hi[i + 1]
            del lo[i + 1], hi[i + 1]
        elif left:
            hi[i] = x
        elif right:
            lo[i + 1] = x
        else:
            lo.insert(i + 1, x)
            hi.insert(i + 1, x)

    def clear(self) -> None:
        self._lo.clear()
        self._hi.clear()

    @property
    def runs(self) -> int:
        return len(self._lo)


class TokenSet:
    """A set of one vCPU's tokens: well-formed ones as runs of their ids, others (malformed) apart. Membership is a
    set's: True is token 1, 4097.0 is 4097."""

    __slots__ = ("_ids", "_other", "_vcpu")

    def __init__(self, vcpu: Any) -> None:
        vcpu = _integral(vcpu)
        self._vcpu = vcpu if type(vcpu) is int else None
        self._ids = IdRuns()
        self._other: set[Any] = set()

    def __contains__(self, token: Any) -> bool:
        token = _integral(token)
        if type(token) is int and token & _VCPU_MASK == self._vcpu:
            return (token >> TOKEN_VCPU_BITS) in self._ids
        return token in self._other

    def __bool__(self) -> bool:
        return bool(self._ids.runs or self._other)

    def add(self, token: Any) -> None:
        token = _integral(token)
        if type(token) is int and token & _VCPU_MASK == self._vcpu:
            self._ids.add(token >> TOKEN_VCPU_BITS)
        else:
            self._other.add(token)

    def clear(self) -> None:
        self._ids.clear()
        self._other.clear()

    @property
    def size(self) -> int:
        """Entries held: runs plus malformed tokens (what memory grows with)."""
        return self._ids.runs + len(self._other)


class IdMap(Generic[V]):
    """A map of ints to values held as sorted, disjoint runs [lo, hi] of one value each (adjacent runs of one
    value are merged)."""

    __slots__ = ("_hi", "_lo", "_val")

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []
        self._val: list[V] = []

    def get(self, x: int) -> V | None:
        i = bisect_right(self._lo, x) - 1
        return self._val[i] if i >= 0 and x <= self._hi[i] else None

    def set(self, x: int, value: V) -> None:
        lo, hi, val = self._lo, self._hi, self._val
        if hi and x == hi[-1] + 1 and _same(val[-1], value):  # the next id, the same value: the common case
            hi[-1] = x
            return
        i = bisect_right(lo, x) - 1
        if i >= 0 and x <= hi[i]:  # inside a run
            if _same(val[i], value):
                return
            # split the run around x
            a, b, v = lo[i], hi[i], val[i]
            del lo[i], hi[i], val[i]
            pieces = [(a, x - 1, v), (x, x, value), (x + 1, b, v)]
            at = i
            for p in pieces:
                if p[0] <= p[1]:
                    lo.insert(at, p[0])
                    hi.insert(at, p[1])
                    val.insert(at, p[2])
                    at += 1
            i = lo.index(x)
        else:
            i += 1
            lo.insert(i, x)
            hi.insert(i, x)
            val.insert(i, value)
        # merge with the neighbours that hold the same value and touch
        if i + 1 < len(lo) and lo[i + 1] == hi[i] + 1 and _same(val[i + 1], val[i]):
            hi[i] = hi[i + 1]
            del lo[i + 1], hi[i + 1], val[i + 1]
        if i > 0 and hi[i - 1] + 1 == lo[i] and _same(val[i - 1], val[i]):
            hi[i - 1] = hi[i]
            del lo[i], hi[i], val[i]

    @property
    def runs(self) -> int:
        return len(self._lo)


class TokenMap(Generic[V]):
    """A map of one vCPU's tokens to values: well-formed tokens as runs of their ids, others apart."""

    __slots__ = ("_ids", "_other", "_vcpu")

    def __init__(self, vcpu: Any) -> None:
        vcpu = _integral(vcpu)
        self._vcpu = vcpu if type(vcpu) is int else None
        self._ids: IdMap[V] = IdMap()
        self._other: dict[Any, V] = {}

    def get(self, token: Any) -> V | None:
        token = _integral(token)
        if type(token) is int and token & _VCPU_MASK == self._vcpu:
            return self._ids.get(token >> TOKEN_VCPU_BITS)
        return self._other.get(token)

    def set(self, token: Any, value: V) -> None:
        token = _integral(token)
        if type(token) is int and token & _VCPU_MASK == self._vcpu:
            self._ids.set(token >> TOKEN_VCPU_BITS, value)
        else:
            self._other[token] = value

    @property
    def size(self) -> int:
        return self._ids.runs + len(self._other)
