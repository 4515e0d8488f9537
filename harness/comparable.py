"""Whether two runs can be compared: the facts that must match per task and backend, and how they differ."""

from __future__ import annotations

from collections.abc import Callable

from harness.stats import data_label

# Spec fields that may differ between comparable runs: the seed is per repeat.
SPEC_FREE = ("seed",)


def _env(key: str) -> Callable[[dict], object]:
    return lambda r: (r.get("env") or {}).get(key)


def _data(r: dict):
    return data_label(r.get("data"), sizes=False)


def _sizes(r: dict):
    d = r.get("data") or {}
    return f"{d.get('n_train')} train / {d.get('n_test')} test" if d else None


def _device(r: dict):
    env = r.get("env") or {}
    if not env.get("device"):
        return None
    name = env.get("device_name")
    return f"{env['device']} ({name})" if name and name != env["device"] else env["device"]


def execution(r: dict):
    """The program a record's cell trained in (env.execution; env.mode for records from before it was named)."""
    env = r.get("env") or {}
    return env.get("execution") or env.get("mode")


def _chosen(records: list[dict]) -> bool:
    """Whether every record let --mode best choose its program (then another choice is reported, not refused)."""
    return bool(records) and all((r.get("env") or {}).get("mode_requested") == "best" for r in records)


# (what, value of one record). None means "not known" (a skipped cell) and never differs.
FACTS: tuple[tuple[str, Callable[[dict], object]], ...] = (
    ("dataset", _data),
    ("sizes", _sizes),
    ("device", _device),
    ("precision", _env("precision")),
    ("execution", execution),
    ("data-parallel degree", _env("data_parallel")),
    ("host CPU", _env("cpu")),
    ("framework version", lambda r: (f"{(r.get('env') or {}).get('framework')} "
                                     f"{(r.get('env') or {}).get('framework_version')}"
                                     if (r.get("env") or {}).get("framework_version") else None)),
)


def _spec_items(r: dict) -> dict:
    spec = r.get("spec") or {}
    return {k: v for k, v in spec.items() if k not in SPEC_FREE}


def _text(values: set) -> str:
    return ", ".join(sorted(values)) if values else "?"


def _group(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        out.setdefault((str(r.get("task")), str(r.get("backend"))), []).append(r)
    return out


def differences(base: list[dict], new: list[dict]) -> list[str]:
    """One line per fact that differs, naming base's and new's values and the task/backend cells it holds for.

    Checked per (task, backend) present in both runs, so a CPU run against a GPU run is
    caught even though their cells never match by device.
    """
    found: dict[tuple[str, str, str], list[str]] = {}
    b_tasks, n_tasks = ({str(r.get("task")) for r in rs} for rs in (base, new))
    if b_tasks != n_tasks:  # a missing backend is a regression; a missing task is another benchmark
        found[("tasks", _text(b_tasks), _text(n_tasks))] = ["the whole run"]
    b_cells, n_cells = _group(base), _group(new)
    for key in sorted(set(b_cells) & set(n_cells)):
        label = "/".join(key)
        chosen = _chosen(b_cells[key]) and _chosen(n_cells[key])
        facts = [fact for fact in FACTS if not (chosen and fact[0] == "execution")]
        spec_keys = sorted({k for r in b_cells[key] + n_cells[key] for k in _spec_items(r)})
        facts += [(f"spec.{k}", (lambda r, k=k: _spec_items(r).get(k))) for k in spec_keys]
        for what, value in facts:
            b_vals = {repr_value(v) for v in map(value, b_cells[key]) if v is not None}
            n_vals = {repr_value(v) for v in map(value, n_cells[key]) if v is not None}
            if b_vals and n_vals and b_vals != n_vals:
                found.setdefault((what, _text(b_vals), _text(n_vals)), []).append(label)
    lines = []
    for (what, b, n), cells in found.items():
        where = ", ".join(cells[:4]) + (f" and {len(cells) - 4} more" if len(cells) > 4 else "")
        lines.append(f"{what}: base {b}, new {n} ({where})")
    return lines


def chosen_programs(base: list[dict], new: list[dict]) -> list[str]:
    """One line per cell where --mode best chose other programs in base and new: reported beside the figures."""
    b_cells, n_cells = _group(base), _group(new)
    lines = []
    for key in sorted(set(b_cells) & set(n_cells)):
        b_vals, n_vals = ({v for v in map(execution, cells[key]) if v} for cells in (b_cells, n_cells))
        if _chosen(b_cells[key]) and _chosen(n_cells[key]) and b_vals and n_vals and b_vals != n_vals:
            lines.append(f"{'/'.join(key)}: base chose {_text(b_vals)}, new chose {_text(n_vals)}")
    return lines


def repr_value(value) -> str:
    """A fact's value as short text: specs' nested lists and dicts compactly, strings as they are."""
    if isinstance(value, str):
        return value
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
