"""apf_emu/idset.py against plain sets and dicts: the same answers whatever the order of adds and sets, and few runs
for what alloc_apf_token hands out (ids one after another)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from apf_emu.idset import IdMap, IdRuns, TokenMap, TokenSet
from shared.abi import TOKEN_VCPU_BITS

VCPU = 3
ids = st.integers(0, 40)
# also what a JSON log may hold where a token should be: true/false, and floats a set takes for ints
tokens = st.one_of(ids.map(lambda i: i << TOKEN_VCPU_BITS | VCPU), st.integers(0, 1 << 16), st.none(),
                   st.booleans(), ids.map(lambda i: float(i << TOKEN_VCPU_BITS | VCPU)), st.just(0.5))


class IdRunsModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.runs, self.model = IdRuns(), set[int]()

    @rule(x=ids)
    def add(self, x: int) -> None:
        self.runs.add(x)
        self.model.add(x)

    @rule()
    def clear(self) -> None:
        self.runs.clear()
        self.model.clear()

    @invariant()
    def same_members_as_few_runs_as_can_be(self) -> None:
        assert {x for x in range(-1, 42) if x in self.runs} == self.model
        # disjoint, non-adjacent runs: exactly as many as the model's maximal runs of consecutive ids
        assert self.runs.runs == sum(1 for x in self.model if x - 1 not in self.model)


class IdMapModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.map, self.model = IdMap[int](), dict[int, int]()

    @rule(x=ids, value=st.integers(0, 2))
    def set(self, x: int, value: int) -> None:
        self.map.set(x, value)
        self.model[x] = value

    @invariant()
    def same_values_as_few_runs_as_can_be(self) -> None:
        assert {x: self.map.get(x) for x in range(-1, 42) if self.map.get(x) is not None} == self.model
        starts = sum(1 for x, v in self.model.items() if self.model.get(x - 1) != v)
        assert self.map.runs == starts


TestIdRuns = IdRunsModel.TestCase
TestIdMap = IdMapModel.TestCase
TestIdRuns.settings = TestIdMap.settings = settings(max_examples=300, stateful_step_count=40)


@given(st.lists(tokens, max_size=60), st.lists(tokens, max_size=20))
def test_token_set_is_a_set(added, probes):
    s, model = TokenSet(VCPU), set()
    for t in added:
        s.add(t)
        model.add(t)
    assert all((t in s) == (t in model) for t in [*added, *probes])
    assert bool(s) == bool(model)


@given(st.lists(st.tuples(tokens, st.sampled_from([0, 1, 1.0, 2])), max_size=60), st.lists(tokens, max_size=20))
def test_token_map_is_a_dict(sets, probes):
    m, model = TokenMap[int](VCPU), {}
    for t, v in sets:
        m.set(t, v)
        model[t] = v
    assert all(m.get(t) == model.get(t) and type(m.get(t)) is type(model.get(t)) for t in [*model, *probes])


def test_alloc_apf_tokens_are_one_run():
    """kvm_setup_async_pf's tokens (alloc_apf_token: id++ << 12 | vcpu_id) of a long run take one entry."""
    s, m = TokenSet(VCPU), TokenMap[int](VCPU)
    for apf_id in range(1, 100_000):
        token = apf_id << TOKEN_VCPU_BITS | VCPU
        s.add(token)
        m.set(token, 1 if apf_id < 50_000 else 2)  # a second boot from id 50000 on
    assert s.size == 1 and m.size == 2
    assert (50_000 << TOKEN_VCPU_BITS | VCPU) in s and (100_000 << TOKEN_VCPU_BITS | VCPU) not in s
    assert m.get(49_999 << TOKEN_VCPU_BITS | VCPU) == 1 and m.get(50_000 << TOKEN_VCPU_BITS | VCPU) == 2
