"""The imports of stagewise modules that stagewise defers into functions, all for start-up time:
a command imports what it runs (`stagewise check` never imports torch), and reading a run back
does not pay for what training needs. An import inside a function is allowed only where listed
here (tests/test_layout.py checks it), and it still goes down the layers like any other."""

from __future__ import annotations

LAZY_IMPORTS: dict[str, frozenset[str]] = {
    # Each command imports what it runs: `runs` without torch, `report` without the trainer.
    "stagewise.cli": frozenset({
        "stagewise", "stagewise.api.user_plan", "stagewise.tasks.chat", "stagewise.track.plan_view",
        "stagewise.track.plots", "stagewise.track.runs", "stagewise.track.trained", "stagewise.engine.verify"}),
    # The report page is drawn (matplotlib) only when asked for, and for the trackers at a run's end.
    "stagewise.api.read_runs": frozenset({"stagewise.track.report"}),
    # A search's report names its storage; the study module imports the trainer (torch).
    "stagewise.track.report": frozenset({"stagewise.tuning.study"}),
}
