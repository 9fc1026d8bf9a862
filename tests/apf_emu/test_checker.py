# The checker accepts the logs of a real clean run and flags each kind of corruption with the right invariant.
from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from apf_emu.checker import INVARIANTS, Checker, check_events
from apf_emu.logs import ReadReport, read_merged
from shared.abi import KVM_APF_WAKE_ALL_TOKEN, make_token

ROOT = Path(__file__).resolve().parents[2]
Events = list[dict]


@pytest.fixture
def events(clean_logs) -> Events:
    return list(read_merged([str(clean_logs)]))


def first(evs: Events, name: str, **match) -> int:
    return next(i for i, e in enumerate(evs) if e["event"] == name and all(e.get(k) == v for k, v in match.items()))


def at(evs: Events, i: int, **changes) -> dict:
    ev = copy.deepcopy(evs[i])
    ev.update(changes)
    return ev


def a_token(evs: Events) -> tuple[int, int]:
    """Index of a not-present event whose token was later readied and woken on the same vCPU."""
    for i, e in enumerate(evs):
        if e["event"] == "kvm_async_pf_not_present":
            return i, e["token"]
    raise AssertionError("no APF in the run")


def drop_ready(evs: Events) -> Events:
    _, token = a_token(evs)
    return [e for e in evs if not (e["event"] == "kvm_async_pf_ready" and e.get("token") == token)]


def duplicate_token(evs: Events) -> Events:
    i, token = a_token(evs)
    j = next(k for k in range(i + 1, len(evs)) if evs[k]["event"] == "kvm_async_pf_not_present"
             and evs[k]["vcpu"] == evs[i]["vcpu"])
    evs[j] = at(evs, j, token=token)
    return evs


def deliver_after_disable(evs: Events) -> Events:
    i = first(evs, "msr_write", msr="MSR_KVM_ASYNC_PF_EN", value=0)
    evs.insert(i + 1, at(evs, i, event="kvm_async_pf_ready", token=KVM_APF_WAKE_ALL_TOKEN, gfn=-1,
                         mono_ns=evs[i]["mono_ns"] + 1))
    return evs


def wake_before_ready(evs: Events) -> Events:
    _, token = a_token(evs)
    r = first(evs, "kvm_async_pf_ready", token=token)
    w = first(evs, "guest_apf_wake", token=token)
    wake = evs.pop(w)
    wake["mono_ns"] = evs[r]["mono_ns"] - 1
    evs.insert(r, wake)
    return evs


def fail_data_check(evs: Events) -> Events:
    i = first(evs, "guest_data_check")
    evs[i] = at(evs, i, ok=False)
    return evs


def drop_wake(evs: Events) -> Events:
    i = first(evs, "guest_apf_wake", all=False)
    task, token = evs[i]["task"], evs[i]["token"]
    return [e for e in evs if not (e["event"] in ("guest_apf_wake", "guest_apf_ack") and e.get("token") == token
                                   and e.get("task", task) == task)]


def second_ready(evs: Events) -> Events:
    _, token = a_token(evs)
    a = first(evs, "guest_apf_ack", token=token)
    evs.insert(a + 1, at(evs, first(evs, "kvm_async_pf_ready", token=token), mono_ns=evs[a]["mono_ns"] + 1))
    evs.insert(a + 2, at(evs, a, mono_ns=evs[a]["mono_ns"] + 2))
    return evs


def ready_without_not_present(evs: Events) -> Events:
    i, _ = a_token(evs)
    r = first(evs, "kvm_async_pf_ready", vcpu=evs[i]["vcpu"], token=evs[i]["token"])
    evs[r] = at(evs, r, token=make_token(999_999, evs[i]["vcpu"]))
    return evs


def too_many_outstanding(evs: Events) -> Events:
    i, _ = a_token(evs)
    extra = [at(evs, i, token=make_token(500_000 + k, evs[i]["vcpu"]), mono_ns=evs[i]["mono_ns"]) for k in range(64)]
    return evs[: i + 1] + extra + evs[i + 1 :]


def malformed_token(evs: Events) -> Events:
    i, _ = a_token(evs)
    evs[i] = at(evs, i, token=make_token(5, evs[i]["vcpu"] + 1))
    return evs


def two_readies_unacked(evs: Events) -> Events:
    _, token = a_token(evs)
    a = first(evs, "guest_apf_ack", token=token)
    return evs[:a] + evs[a + 1 :]


def leak_dummy(evs: Events) -> Events:
    i = first(evs, "guest_apf_wake", all=False)
    token = evs[i]["token"]
    evs[i] = at(evs, i, event="guest_apf_dummy", action="created")
    del evs[i]["task"]
    evs.insert(i + 1, at(evs, i, event="guest_apf_wake", token=token, all=False, task=-1,
                         mono_ns=evs[i]["mono_ns"]))
    return evs


def guest_panic(evs: Events) -> Events:
    i = first(evs, "guest_apf_wait")
    evs.insert(i + 1, at(evs, i, event="guest_panic", reason="Host injected async #PF in kernel mode"))
    return evs


def late_ready(evs: Events) -> Events:
    _, token = a_token(evs)
    c = first(evs, "kvm_async_pf_completed", token=token)
    evs[c] = at(evs, c, mono_ns=evs[c]["mono_ns"] - 2_000_000_000)  # completed 2 s before it was delivered
    return evs


def stale_boot_ready(evs: Events) -> Events:
    _, token = a_token(evs)
    r = first(evs, "kvm_async_pf_ready", token=token)
    evs[r] = at(evs, r, boot=evs[r]["boot"] - 1)  # sent by the connection of an earlier boot
    return evs


def fault_again_and_again(evs: Events) -> Events:
    i, _token = a_token(evs)
    e = evs[i]
    repeats = [at(evs, i, token=make_token(0x7000 + k, e["vcpu"]), mono_ns=e["mono_ns"] + 1 + k) for k in range(40)]
    return evs[: i + 1] + repeats + evs[i + 1:]


def ready_for_halted_fault(evs: Events) -> Events:
    """The not-present was not injected (the vCPU halted on it), yet its page-ready is injected: KVM's
    kvm_arch_async_page_present injects only when work->wakeup_all or work->notpresent_injected."""
    i, _ = a_token(evs)
    evs[i] = at(evs, i, injected=False)
    return evs


def wait_on_a_genuine_fault(evs: Events) -> Events:
    """A task sleeps on a token no not-present carried: on `pf` a nested genuine #PF that read the outer's reason
    sleeps on its own address, (u32)0x...f48."""
    i = first(evs, "guest_apf_wait")
    evs[i] = at(evs, i, token=0x00D7_1F48)
    return evs


def sigsegv_at_a_token(evs: Events) -> Events:
    """The guest took an APF #PF for an ordinary fault at CR2 = token (`pf`, when a nested #PF ate the reason)."""
    i, token = a_token(evs)
    evs.insert(i + 1, {**at(evs, i, event="guest_sigsegv", role="guest", task=1, address=token, token=token,
                            gfn=None, mono_ns=evs[i]["mono_ns"] + 1)})
    return evs


def double_fault(evs: Events) -> Events:
    i, token = a_token(evs)
    evs.insert(i + 1, at(evs, i, event="kvm_multiple_exception", prev=14, prev_cr2=token, nr=14, cr2=0xFFFF_FFFF,
                         result="double_fault", mono_ns=evs[i]["mono_ns"] + 1))
    return evs


def hlt_spin(evs: Events) -> Events:
    """The host's kvm_hlt_spin: 1,000 HLTs in a row returned at once (host_daemon/vcpu.py's hlt_returned)."""
    i, _ = a_token(evs)
    evs.insert(i + 1, {k: v for k, v in at(evs, i, event="kvm_hlt_spin", count=1000, done=3,
                                             mono_ns=evs[i]["mono_ns"] + 1).items()
                       if k not in ("token", "gva", "gfn", "injected")})
    return evs


def repeated_fault_elsewhere(evs: Events) -> Events:
    """__kvm_faultin_pfn traces kvm_async_pf_repeated_fault only when kvm_find_async_pf_gfn finds the gfn: one on
    a gfn nothing is paging in is a host whose gfn hash is wrong."""
    i, _ = a_token(evs)
    evs.insert(i + 1, {k: v for k, v in at(evs, i, event="kvm_async_pf_repeated_fault", gfn=10**6,
                                             mono_ns=evs[i]["mono_ns"] + 1).items()
                       if k not in ("token", "injected", "vector")})
    return evs


def ready_before_completion(evs: Events) -> Events:
    """A page-ready whose page-in never completed: async_pf_execute puts an item on the done list only once its
    page is in (apf-emu's host logs kvm_async_pf_completed then, before any exit can dequeue it)."""
    _, token = a_token(evs)
    return [e for e in evs if not (e["event"] == "kvm_async_pf_completed" and e.get("token") == token)]


def enable_before_vector(evs: Events) -> Events:
    """MSR_KVM_ASYNC_PF_EN enabled before MSR_KVM_ASYNC_PF_INT was written (kvm_pv_enable_async_pf): vector 0."""
    i = first(evs, "msr_write", msr="MSR_KVM_ASYNC_PF_INT")
    return evs[:i] + evs[i + 1:]


MUTATIONS: dict[str, Callable[[Events], Events]] = {
    "repeated_fault_outstanding": repeated_fault_elsewhere,
    "completed_before_ready": ready_before_completion,
    "msr_order": enable_before_vector,
    "halt_spin": hlt_spin,
    "wait_matches_not_present": wait_on_a_genuine_fault,
    "apf_as_genuine": sigsegv_at_a_token,
    "double_fault": double_fault,
    "token_format": malformed_token,
    "token_unique": duplicate_token,
    "ready_after_not_present": ready_without_not_present,
    "ready_once": second_ready,
    "one_unacked_ready": two_readies_unacked,
    "delivered_while_disabled": deliver_after_disable,
    "outstanding_limit": too_many_outstanding,
    "wake_matches_ready": wake_before_ready,
    "wait_woken": drop_wake,
    "dummy_leak": leak_dummy,
    "data_check": fail_data_check,
    "guest_panic": guest_panic,
    "ready_latency": late_ready,
    "stale_token": stale_boot_ready,
    "ready_for_injected_only": ready_for_halted_fault,
    "retry_loop": fault_again_and_again,
}


def test_ready_latency_limit_is_configurable(events):
    assert check_events(events, ready_latency_limit_ms=60_000) == []
    tight = check_events(events, ready_latency_limit_ms=0.000001)
    assert tight and {v.invariant for v in tight} == {"ready_latency"}


def test_ready_latency_counts_from_a_prefault(events):
    """A completed page-in whose page had to be faulted in again at delivery (kvm_arch_async_page_ready, logged as
    apf_sync_fault with reason prefault once the page is in) is due from the prefault: the late completion alone
    is flagged, the same with a prefault just before the ready is not."""
    late = late_ready(events)
    _, token = a_token(late)
    r = first(late, "kvm_async_pf_ready", token=token)
    prefault = at(late, r, event="apf_sync_fault", reason="prefault", mono_ns=late[r]["mono_ns"] - 1)
    for key in ("injected", "vector", "released", "gva"):
        prefault.pop(key, None)
    assert "ready_latency" in {v.invariant for v in check_events(copy.deepcopy(late))}
    assert "ready_latency" not in {v.invariant for v in check_events([*late[:r], prefault, *late[r:]])}


def test_the_latency_limit_recorded_in_the_logs_is_the_one_used(events):
    """`apf-emu run` and `chaos` write harness_settings before anything starts; `apf-emu check` of the same logs
    takes its ready-latency limit, unless the command line gives one."""
    late = [e for e in late_ready(events) if e.get("role") != "harness"]  # a page-ready 2 s after its completion
    settings = {"event": "harness_settings", "role": "harness", "vm": late[0]["vm"], "vcpu": None, "boot": None,
                "mono_ns": late[0]["mono_ns"] - 1, "command": "chaos", "ready_latency_limit_ms": 5000.0}
    assert "ready_latency" in {v.invariant for v in check_events(copy.deepcopy(late))}
    assert "ready_latency" not in {v.invariant for v in check_events([settings, *copy.deepcopy(late)])}
    given = check_events([settings, *late], ready_latency_limit_ms=1000.0)
    assert "ready_latency" in {v.invariant for v in given}


def test_every_invariant_has_a_mutation():
    assert MUTATIONS.keys() == INVARIANTS.keys()


def test_clean_logs_pass(events):
    assert check_events(events) == []


@pytest.mark.parametrize("invariant", sorted(MUTATIONS))
def test_mutation_is_flagged_with_its_invariant(events, invariant):
    violations = check_events(MUTATIONS[invariant](events))
    assert invariant in {v.invariant for v in violations}, [v.invariant for v in violations]
    v = next(v for v in violations if v.invariant == invariant)
    assert v.event and v.message


def test_drop_ready_is_flagged(events):
    assert {"wake_matches_ready"} <= {v.invariant for v in check_events(drop_ready(events))}


def test_cut_last_line_is_tolerated_and_reported(clean_logs, tmp_path):
    for f in clean_logs.iterdir():
        data = f.read_bytes()
        (tmp_path / f.name).write_bytes(data[: -40] if f.name == "guest-0.jsonl" else data)
    report = ReadReport()
    evs = list(read_merged([str(tmp_path)], report))
    assert len(report.truncated) == 1 and "guest-0.jsonl:" in report.truncated[0]
    assert report.unreadable == []
    violations = check_events(evs)
    # the cut line was guest_shutdown of a boot: its end is unknown, at most its last waits are open
    assert {v.invariant for v in violations} <= {"wait_woken", "dummy_leak"}


@pytest.mark.parametrize("args,status", [(["CLEAN"], 0), (["MISSING"], 2), (["MUTATED"], 1)])
def test_check_command_exit_status(clean_logs, tmp_path, args, status):
    mutated = tmp_path / "mutated.jsonl"
    import orjson

    evs = fail_data_check(list(read_merged([str(clean_logs)])))
    mutated.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in evs))
    paths = {"CLEAN": str(clean_logs), "MISSING": str(tmp_path / "nope"), "MUTATED": str(mutated)}
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "check", *[paths[a] for a in args]], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == status, proc.stdout + proc.stderr
    if status == 1:
        assert "VIOLATION data_check" in proc.stdout


def test_check_reads_stdin_like_compose_logs(clean_logs):
    """`docker compose logs --no-log-prefix | apf-emu check -`: all processes' lines interleaved on one stream."""
    data = b"".join(f.read_bytes() for f in sorted(clean_logs.glob("*.jsonl")))
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "check", "-"], cwd=ROOT, input=data,
                          capture_output=True)
    assert proc.returncode == 0, proc.stdout.decode()[-2000:]
    assert b"0 violations" in proc.stdout


def test_check_json_output_names_the_invariant_and_context(clean_logs, tmp_path):
    import orjson

    evs = drop_wake(list(read_merged([str(clean_logs)])))
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in evs))
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "check", "--json", str(path)], cwd=ROOT,
                          capture_output=True)
    assert proc.returncode == 1
    lines = [orjson.loads(line) for line in proc.stdout.splitlines()]
    assert lines and all({"invariant", "message", "event", "context"} <= set(v) for v in lines)
    assert "wait_woken" in {v["invariant"] for v in lines}
    assert all(len(v["context"]) <= 6 for v in lines)


def _ev(name: str, t: int, role: str, **fields: object) -> dict:
    return {"event": name, "mono_ns": t, "role": role, "vm": "vm", "vcpu": 0, "boot": 1, **fields}


def test_a_disconnect_ends_a_boot_unless_the_same_boot_comes_back():
    """A guest killed under `run` leaves its waits behind: the host's vcpu_disconnect ends its boot, unjudged. The
    same boot restored on a new host (a reconnect) is alive again, and its waits are judged at the end."""
    killed = [_ev("guest_boot", 1, "guest"), _ev("guest_apf_wait", 2, "guest", token=0x1000, task=0),
              _ev("vcpu_disconnect", 3, "host")]
    assert check_events(copy.deepcopy(killed)) == []
    back = [*killed, _ev("vcpu_connect", 4, "host", restored=True)]
    assert {v.invariant for v in check_events(back)} == {"wait_woken"}


def test_token_state_is_bounded_by_live_tokens():
    """A long run's tokens (alloc_apf_token: one id after another) cost the checker the same few entries as a short
    run's: its seen, readied and issued-to-boot sets grow with the tokens still live, not with the log."""
    def host(event: str, t: int, **fields) -> dict:
        return {"role": "host", "vm": "v", "vcpu": 1, "boot": 1, "event": event, "mono_ns": t, **fields}

    def cycles(n: int) -> list[dict]:
        evs = [host("vcpu_connect", 1), host("msr_write", 2, msr="MSR_KVM_ASYNC_PF_INT", value=243, ok=True),
               host("msr_write", 3, msr="MSR_KVM_ASYNC_PF_EN", value=73, ok=True)]
        t = 10
        live: list[int] = []
        last: int | None = None  # the page-ready before: the guest (which does not log) released it
        for apf_id in range(1, n + 1):
            token = make_token(apf_id, 1)
            evs.append(host("kvm_async_pf_not_present", t, token=token, gfn=apf_id % 50, injected=True))
            live.append(token)
            if len(live) == 8:  # page-ins complete out of order, a few at a time
                for tok in (live.pop(3), live.pop(0)):
                    evs += [host("kvm_async_pf_completed", t + 1, token=tok),
                            host("kvm_async_pf_ready", t + 2, token=tok, injected=True, released=last)]
                    last = tok
            t += 3
        return evs

    def state(n: int) -> int:
        checker = Checker()
        assert checker.check(cycles(n)) == []
        st = checker._host[("v", 1)]
        return st.seen.size + st.readied.size + st.issued_boot.size + len(st.outstanding) + len(st.completed)

    small, large = state(100), state(20_000)
    assert large <= small + 2, (small, large)
