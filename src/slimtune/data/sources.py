"""Named evaluation and calibration sets (`wikitext2`, `wikitext2:valid`, `c4`) that resolve from any directory.

Each name is looked up, in this order:

1. `$SLIMTUNE_DATA/<relative path>`, when the variable is set;
2. `<project root>/../shared/data/<relative path>` (the developers' and CI layout beside a checkout);
3. the same set from the Hugging Face hub through `datasets`, as the GPTQ/SparseGPT papers load it (a cached copy
   serves offline too).

The data folder's layout is `wikitext-2-raw/wiki.test.raw`, `wikitext-2-raw/wiki.valid.raw` and
`c4/c4-validation-sample.jsonl` (the first 1,025 documents of C4 en validation shard 0, one `{"text": ...}` a line;
from the hub the same 1,025 documents are taken). Offline with none of these, the error says in one line what was
tried and how to fix it. No Lightning here: the perplexity and calibration code of the pure layers use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimtune.errors import SlimtuneError, choices

__all__ = ["DATA_ENV", "EVAL_NAMES", "SOURCES", "NamedSource", "check_available", "eval_text", "is_named_source", "load_named",
           "local_path", "tried_paths"]

DATA_ENV = "SLIMTUNE_DATA"
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class NamedSource:
    name: str
    relative_path: str  # inside the data folder
    hub: dict[str, Any] = field(default_factory=dict)  # the `load_raw` config of the same set on the hub
    what: str = ""
    # The local file is one plain-text document while the hub holds its lines as rows: joined (a blank row back to
    # the raw file's " \n"), they are the file.
    one_document: bool = False


SOURCES: dict[str, NamedSource] = {
    s.name: s
    for s in (
        NamedSource("wikitext2", "wikitext-2-raw/wiki.test.raw",
                    {"dataset": "Salesforce/wikitext", "dataset_config": "wikitext-2-raw-v1", "split": "test"},
                    "WikiText-2 raw, test split", one_document=True),
        NamedSource("wikitext2:test", "wikitext-2-raw/wiki.test.raw",
                    {"dataset": "Salesforce/wikitext", "dataset_config": "wikitext-2-raw-v1", "split": "test"},
                    "WikiText-2 raw, test split", one_document=True),
        NamedSource("wikitext2:valid", "wikitext-2-raw/wiki.valid.raw",
                    {"dataset": "Salesforce/wikitext", "dataset_config": "wikitext-2-raw-v1", "split": "validation"},
                    "WikiText-2 raw, validation split", one_document=True),
        NamedSource("c4", "c4/c4-validation-sample.jsonl",
                    {"dataset": "allenai/c4", "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                     "split": "validation", "max_examples": 1025},
                    "C4 en validation sample"),
    )
}


# The sets PerplexityEvaluation can measure on (as one text); c4 serves calibration.
EVAL_NAMES = ("wikitext2", "wikitext2:test", "wikitext2:valid")


def is_named_source(value: Any) -> bool:
    return isinstance(value, str) and value in SOURCES


def _source(name: str) -> NamedSource:
    if name not in SOURCES:
        raise SlimtuneError(f"data source {name!r} is not known; valid: {choices(SOURCES)}")
    return SOURCES[name]


def _default_project_root() -> Path:
    from slimtune.config import project_root

    return project_root()


def tried_paths(name: str, project_root: str | Path | None = None) -> list[tuple[str, Path | None]]:
    """The local places looked at for `name`, in order: ($SLIMTUNE_DATA, path or None when unset), (../shared/data, path)."""
    relative = _source(name).relative_path
    env = os.environ.get(DATA_ENV)
    root = Path(project_root) if project_root is not None else _default_project_root()
    return [
        (f"${DATA_ENV}", Path(env).expanduser() / relative if env else None),
        ("../shared/data", root.parent / "shared" / "data" / relative),
    ]


def local_path(name: str, project_root: str | Path | None = None) -> Path | None:
    """The first local copy of `name` that exists ($SLIMTUNE_DATA, then ../shared/data beside the project), or None."""
    for _label, path in tried_paths(name, project_root):
        if path is not None and path.is_file():
            return path
    return None


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _not_found(name: str, project_root, reason: str) -> SlimtuneError:
    tried = "; ".join(f"{label}={path}" if path else f"{label} (unset)" for label, path in tried_paths(name, project_root))
    source = _source(name)
    hub = source.hub["dataset"] + (f" {source.hub['dataset_config']}" if source.hub.get("dataset_config") else "")
    return SlimtuneError(
        f"data source {name!r} ({source.what}) was not found: tried {tried}; hub {hub}: {reason}; fix: set "
        f"{DATA_ENV} to a folder holding wikitext-2-raw/ and c4/, or go online (unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)"
    )


def _hub_rows(name: str, project_root: str | Path | None):
    from slimtune.data.datasets import load_raw

    try:
        return load_raw(_source(name).hub)
    except SlimtuneError as err:
        reason = str(err).split(" could not be loaded: ", 1)[-1]
        raise _not_found(name, project_root, f"offline ({reason})" if _offline() else reason) from None


def load_named(name: str, project_root: str | Path | None = None):
    """`name` as a `datasets.Dataset` with a `text` column, the same from the local copy as from the hub: WikiText-2
    as one document (the raw file's text), C4 as its 1,025 documents."""
    import datasets

    from slimtune.data.datasets import load_raw

    source = _source(name)
    path = local_path(name, project_root)
    if path is not None:
        return load_raw({"path": str(path)})
    rows = _hub_rows(name, project_root)
    if source.one_document:
        return datasets.Dataset.from_dict({"text": ["".join(row or " \n" for row in rows["text"])]})
    return rows


def eval_text(name: str, project_root: str | Path | None = None) -> str:
    """The papers' evaluation string of a WikiText-2 name: its rows joined with "\\n\\n" (local file or hub, the same)."""
    from slimtune.eval.perplexity import read_eval_text

    if name not in EVAL_NAMES:
        raise SlimtuneError(f"evaluation text {name!r} is not an evaluation set; valid: a path to a text file, {choices(EVAL_NAMES)}")
    path = local_path(name, project_root)
    if path is not None:
        return read_eval_text(path)
    # The hub's rows are the file's lines (each keeps its newline, blank lines are ""), so the join is the same.
    return "\n\n".join(_hub_rows(name, project_root)["text"])


def check_available(name: str, project_root: str | Path | None = None) -> None:
    """Fail early, in one line, when `name` has no local copy and the hub cannot be reached (offline, not cached).

    Online nothing is loaded here (the set is fetched when it is used); offline the attempt is quick: the cache has
    it or it fails at once.
    """
    _source(name)
    if local_path(name, project_root) is None and _offline():
        load_named(name, project_root)
