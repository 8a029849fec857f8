"""A run directory seen from Python: what `stagewise.train` returns and `stagewise.open_run` opens.
Its logs (track.runs.Run: events, metrics rows, summaries) plus each stage's rows and export, and
the trained-stage commands (generate, evaluate, export) on them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stagewise.engine.progress import StageSummary
from stagewise.engine.run_logs import read_jsonl
from stagewise.errors import UserError
from stagewise.tasks.export import MARKER
from stagewise.tasks.spec import GenerateOptions
from stagewise.track.runs import Run as RunLogs
from stagewise.track.trained import evaluate as evaluate_stage
from stagewise.track.trained import export as export_stage
from stagewise.track.trained import generate as generate_stage
from stagewise.track.trained import open_stage


@dataclass(frozen=True)
class StageResult:
    """One stage of a run: its metrics rows (train and eval lines), its summary once it ended
    (trained or reused), and its export directory once it is complete."""

    name: str
    metrics: list[dict[str, Any]]
    summary: StageSummary | None
    export: Path | None

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [m for m in self.metrics if m.get("kind") == "eval"]


class Run(RunLogs):
    @classmethod
    def open(cls, path: Path) -> Run:
        if not (path / "plan.yaml").is_file():
            raise UserError(str(path), "not a run directory (no plan.yaml)")
        def rows(name: str) -> list[dict[str, Any]]:
            return read_jsonl(path / name) if (path / name).is_file() else []

        return cls(path, rows("events.jsonl"), rows("metrics.jsonl"), (path / "plan.yaml").read_text(encoding="utf-8"))

    @property
    def stages(self) -> dict[str, StageResult]:
        """Every stage of the plan, in plan order, with what the run has of it so far."""
        summaries = {s.stage: s for s in self.summaries()}
        return {name: StageResult(name, [m for m in self.metrics if m.get("stage") == name], summaries.get(name),
                                  self.exports.get(name)) for name in self.planned_stages}

    @property
    def exports(self) -> dict[str, Path]:
        """The complete exports, by stage."""
        return {name: self.path / "stages" / name for name in self.planned_stages
                if (self.path / "stages" / name / MARKER).is_file()}

    def generate(self, prompt: str = "", *, stage: str | None = None, max_tokens: int | None = None,
                 temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 beam: int = 1, stop: tuple[str, ...] = (), messages: list[dict[str, str]] | None = None) -> str:
        """What a finished stage (default: the last) makes of `prompt` (as `stagewise generate`)."""
        if (max_tokens is not None and max_tokens < 1) or temperature < 0 or (top_k is not None and top_k < 1) \
                or (top_p is not None and not 0 < top_p <= 1) or beam < 1:
            raise UserError("generate", "need --max-tokens >= 1, --temperature >= 0, --top-k >= 1, 0 < --top-p <= 1, "
                                        "--beam >= 1")
        options = GenerateOptions(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                  beam=beam, stop=tuple(stop), messages=tuple(messages) if messages is not None else None)
        return generate_stage(open_stage(self.path, stage), prompt, options)

    def evaluate(self, data: str | Path, *, stage: str | None = None, format: str | None = None,
                 beam: int | None = None) -> dict[str, Any]:
        """A finished stage's metrics on a file like its data (as `stagewise evaluate`): its
        name and task, the metrics, and how many tokens / examples / sentences were scored."""
        if beam is not None and beam < 1:
            raise UserError("--beam", f"must be >= 1 (got {beam})")
        trained = open_stage(self.path, stage)
        return {"stage": trained.name, "task": trained.task, **evaluate_stage(trained, Path(data), format, beam)}

    def export(self, to: str | Path, *, stage: str | None = None) -> tuple[str, Path]:
        """Copy a finished stage's export (default: the last) to `to`, a path that does not exist yet."""
        return export_stage(self.path, stage, Path(to))

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, {self.state})"
