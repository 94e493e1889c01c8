"""Markdown API reference generated from the docstrings of the public API (``docs/api.md``).

    python -m face_assets.apidoc > docs/api.md

A test regenerates it and compares, so the reference never drifts from the code.
"""

from __future__ import annotations

import inspect

from . import errors, evaluation, feedback, library, persons
from .clustering import ReclusterDecision
from .filtering import FaceFilter, filter_image
from .ingest import IngestSummary

SECTIONS = [
    ("Library", [library.FaceRecognitionLibrary]),
    ("Results", [library.SearchResult, library.IndexedImage, library.Comparison, IngestSummary]),
    ("Filtering", [filter_image, FaceFilter]),
    ("Feedback", [library.FeedbackQuery, feedback.Vote, feedback.ExportReport, feedback.FeedbackStore,
                  feedback.mine_negatives]),
    ("Evaluation gate", [evaluation.gate, evaluation.GateResult, evaluation.pair_metrics, evaluation.identity_metrics]),
    ("Person clusters", [persons.ClusterInfo, persons.ClusterRun, ReclusterDecision]),
    ("Exceptions", [obj for _, obj in inspect.getmembers(errors, inspect.isclass)
                    if issubclass(obj, errors.FaceRecognitionError) and obj.__module__ == errors.__name__]),
]


def _doc(obj: object) -> str:
    return inspect.cleandoc(obj.__doc__ or "").strip()


def _signature(name: str, obj: object) -> str:
    try:
        text = f"{name}{inspect.signature(obj, eval_str=True)}"
        for prefix in ("typing.", "collections.abc.", "face_assets.config.", "face_assets.library.", "face_assets.ingest.",
                       "face_assets.schemas.", "face_assets.cartoon.", "face_assets.feedback.", "face_assets.analysis.",
                       "face_assets.persons.", "face_assets.clustering.", "numpy.", "pathlib."):
            text = text.replace(prefix, "")
        return text
    except (NameError, TypeError, ValueError):
        return name


def render() -> str:
    """The whole reference as markdown."""
    out = ["# API reference", "", "Generated from the docstrings by `python -m face_assets.apidoc`.", ""]
    for title, objects in SECTIONS:
        out += [f"## {title}", ""]
        for obj in objects:
            out += [f"### `{_signature(obj.__name__, obj)}`", "", _doc(obj), ""]
            if not inspect.isclass(obj) or issubclass(obj, BaseException):
                continue
            for name, member in inspect.getmembers(obj):
                if name.startswith("_") or not (inspect.isfunction(member) or isinstance(member, property)):
                    continue
                if isinstance(member, property):
                    out += [f"#### `{obj.__name__}.{name}` (property)", "", _doc(member), ""]
                else:
                    out += [f"#### `{obj.__name__}.{_signature(name, member)}`", "", _doc(member), ""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
