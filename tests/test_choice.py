"""The one measured-and-verified choice."""

import multiprocessing as mp

import torch

from convgap import cache, choice, config, timing


def _writer(args):
    directory, i = args
    import os
    os.environ["CONVGAP_CACHE"] = directory
    from convgap import cache as c
    for j in range(20):
        c.update_json("t.json", lambda d: {**d, f"{i}-{j}": j})


def test_concurrent_processes_merge_their_entries(tmp_path):
    """Read-modify-write under a lock: four processes writing 20 keys each lose none."""
    with mp.get_context("spawn").Pool(4) as pool:
        pool.map(_writer, [(str(tmp_path), i) for i in range(4)])
    import os
    os.environ["CONVGAP_CACHE"] = str(tmp_path)
    assert len(cache.read_json("t.json")) == 80


def test_a_wrong_fastest_candidate_is_rejected_and_the_decision_is_stored_by_name():
    ref = torch.ones(3)
    cands = [choice.Candidate("slow", lambda: (torch.ones(3), sum(range(20000)))[0]),
             choice.Candidate("wrong", lambda: ref * 2)]
    with config.override(CHOICE_ROUNDS=timing.QUICK, CONFIRM_ROUNDS=timing.QUICK):
        d = choice.choose(cands, kind="test", spec_key="k")
    assert d.choice == "slow" and "relative error" in d.rejected["wrong"] and not d.cached
    again = choice.choose(list(reversed(cands)), kind="test", spec_key="k")
    assert again.cached and again.choice == "slow"
    stored = cache.read_json(choice.TUNING_FILE)
    (key,) = stored
    assert key.endswith("|test|k") and f"threads={torch.get_num_threads()}" in key
    assert stored[key]["choice"] == "slow"


def test_forget_drops_stored_decisions_so_they_are_measured_again(tmp_path, monkeypatch):
    """forget(kinds) drops those kinds' decisions from memory and the file (the others
    stay); forget() drops them all; a forgotten decision is measured again."""
    monkeypatch.setenv("CONVGAP_CACHE", str(tmp_path))
    choice.clear_memory()

    def cands():
        return [choice.Candidate("a", lambda: torch.ones(2)),
                choice.Candidate("b", lambda: torch.ones(2))]
    with config.override(CHOICE_ROUNDS=timing.QUICK, CONFIRM_ROUNDS=timing.QUICK):
        for kind in ("k1", "k2"):
            assert not choice.choose(cands(), kind=kind, spec_key="s").cached
        assert choice.choose(cands(), kind="k1", spec_key="s").cached
        assert choice.forget(["k1"]) == 1
        assert [k.split("|")[-2] for k in cache.read_json(choice.TUNING_FILE)] == ["k2"]
        assert not choice.choose(cands(), kind="k1", spec_key="s").cached   # measured again
        assert choice.choose(cands(), kind="k2", spec_key="s").cached       # kept
        assert choice.forget() == 2
        assert cache.read_json(choice.TUNING_FILE) == {}
        assert not choice.choose(cands(), kind="k2", spec_key="s").cached
    choice.clear_memory()
