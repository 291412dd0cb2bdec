"""One comparison table of several runs' reports (Markdown and CSV): the offline way to compare a sweep.

    python train.py -m recipe=kd_tiny 'output_dir=outputs/kd/${callbacks.distill.loss}' callbacks.distill.loss=fkl,rkl,jsd
    python -m slimtune.compare outputs/kd --out outputs/kd/comparison

Each argument is a run's `report.json` or a folder searched for them (recursively). A row per run, a column per number
or name the reports hold (paths left out), the columns whose values differ between runs first.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from slimtune.errors import SlimtuneError

__all__ = ["compare_reports", "find_reports", "main"]

_LEFT_OUT = ("report_path",)


def find_reports(paths) -> list[Path]:
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.rglob("report.json")))
        else:
            raise SlimtuneError(f"compare: {str(path)!r} does not exist; valid: report.json files or folders holding them")
    if not found:
        raise SlimtuneError(f"compare: no report.json in {', '.join(map(str, paths))}; valid: the output_dir of runs")
    return found


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def compare_reports(paths, out: str | Path | None = None) -> str:
    """The Markdown table of the reports under `paths`; with `out`, also written to `out`.md and `out`.csv."""
    files = find_reports(paths)
    reports = []
    for file in files:
        try:
            reports.append(json.loads(file.read_text(encoding="utf-8")))
        except ValueError as err:
            raise SlimtuneError(f"compare: {str(file)!r} is not JSON ({err})") from err
    keys: list[str] = []
    for report in reports:
        for key, value in report.items():
            scalar = isinstance(value, (int, float, str, bool)) or value is None
            if scalar and key not in keys and key not in _LEFT_OUT and not key.endswith("_dir"):
                keys.append(key)
    differing = [k for k in keys if len({json.dumps(r.get(k)) for r in reports}) > 1]
    columns = ["run", *differing, *[k for k in keys if k not in differing]]
    rows = [[str(file.parent), *(_shown(r.get(k)) if r.get(k) is not None else "" for k in columns[1:])]
            for file, r in zip(files, reports)]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    markdown = "\n".join(lines) + "\n"
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(markdown, encoding="utf-8")
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        writer.writerows(rows)
        out.with_suffix(".csv").write_text(buffer.getvalue(), encoding="utf-8")
    return markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m slimtune.compare", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="report.json files or folders holding them")
    parser.add_argument("--out", help="write OUT.md and OUT.csv too")
    args = parser.parse_args(argv)
    try:
        print(compare_reports(args.paths, args.out), end="")
    except SlimtuneError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
