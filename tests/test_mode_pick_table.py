"""The mode-pick bench's verdict: the probe's choice against the better forced mode, within the spread or not."""

from bench.mode_pick import row


def records(mode: str, rates: list[float], *, execution: str | None = None, probe: dict | None = None) -> list[dict]:
    return [{"backend": "torch", "status": "ok", "repeat": i,
             "metrics": {"train_samples_per_s": rate, "mode_probe": probe if i == 0 else None},
             "env": {"mode": mode, "execution": execution or f"torch {mode}", "load": {"start": [0.5, 0, 0],
                                                                                      "end": [1.5, 0, 0]}}}
            for i, rate in enumerate(rates)]


def verdict(runs: dict) -> str:
    return row("t", "torch", runs).split(" | ")[-2]


PROBE = {"chosen": "eager", "compiled": 90.0, "eager": 100.0, "rounds": 3}


def test_the_better_mode_chosen_is_right():
    runs = {"eager": records("eager", [100, 102, 98]), "compiled": records("compiled", [80, 81, 79]),
            "best": records("eager", [99, 100, 101], probe=PROBE)}
    line = row("t", "torch", runs)
    assert verdict(runs) == "ok (the better mode)" and "eager (3 rounds)" in line and "90 / 100" in line
    assert line.endswith("| 1.5 |")  # the highest load average of the row's cells


def test_a_worse_mode_within_the_spread_is_noise_and_beyond_it_is_wrong():
    best = records("eager", [99], probe={**PROBE, "untried": {"compiled": "budget"}, "rounds": 0})
    close = {"eager": records("eager", [100, 110, 95]), "compiled": records("compiled", [105, 112, 99]), "best": best}
    assert verdict(close).startswith("ok (within the noise, -5%")
    assert "eager (budget)" in row("t", "torch", close) and "| untried / 100 |" not in row("t", "torch", close)
    assert "| untried / 99 |" not in row("t", "torch", close) and "| untried / 100 |" in row("t", "torch", {
        **close, "best": records("eager", [99], probe={**PROBE, "compiled": None, "untried": {"compiled": "b"}})})
    far = {"eager": records("eager", [100, 101, 99]), "compiled": records("compiled", [150, 151, 149]), "best": best}
    assert verdict(far).startswith("WRONG (-33%")


def test_one_program_for_both_modes_has_nothing_to_pick():
    runs = {"eager": records("eager", [100, 101]), "compiled": records("eager", [150, 151]),
            "best": records("eager", [100])}
    assert verdict(runs) == "ok (one program)"


def test_missing_runs_are_not_judged():
    assert verdict({"eager": records("eager", [100, 101])}) == "n/a"
