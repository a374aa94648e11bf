"""What sources return, and the checks every consumer applies: skip records and the label range.

A record is `{"image": uint8 [H, W, 3], "label": int32 []}` (image sources) or `{"tokens": int32 [L], "label": int32
[]}` (token sources). A file that cannot be decoded gives a *skip record* `{"skipped": path, "reason": str}` instead
of raising, so a corrupt image never stops an epoch; consumers drop it with `keep_record`, which logs it once and
adds it to `skipped_images()`. A label outside the source's classes is never skipped: `check_label` raises.
"""

from __future__ import annotations

import threading

from absl import logging

_SKIPPED: dict[str, str] = {}
_SKIPPED_LOCK = threading.Lock()


class LabelRangeError(ValueError):
    """A record whose label is outside [0, num_classes) of its source (or of the model it is meant for)."""


def skip_record(path: str, error: BaseException | str) -> dict:
    """The record a source returns in place of an image it could not read."""
    reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"skipped": path, "reason": reason}


def note_skipped(path: str, reason: str) -> None:
    """Adds `path` to `skipped_images()`, logging a warning the first time it is seen in this process."""
    with _SKIPPED_LOCK:
        new = path not in _SKIPPED
        _SKIPPED[path] = reason
    if new:
        logging.warning("Skipping unreadable image %s (%s)", path, reason)


def keep_record(record: dict) -> bool:
    """grain filter: False (and `note_skipped`) for skip records, True for real ones."""
    if "skipped" in record:
        note_skipped(record["skipped"], record["reason"])
        return False
    return True


def check_label(record: dict, *, num_classes: int, description: str) -> dict:
    """grain map: `record` unchanged if its label lies in [0, num_classes) (any label when num_classes == 0),
    else `LabelRangeError` naming the source and the label. Skip records pass through."""
    if num_classes > 0 and "label" in record:
        label = int(record["label"])
        if not 0 <= label < num_classes:
            raise LabelRangeError(
                f"{description}: a record has label {label}, outside the {num_classes} classes [0, {num_classes}): "
                "fix the dataset's labels (a tfds test split without labels has -1) or use another split."
            )
    return record


def skipped_images() -> dict[str, str]:
    """{path: reason} of every image skipped so far in this process (the training loop logs `len(...)`)."""
    with _SKIPPED_LOCK:
        return dict(_SKIPPED)


def skipped_count() -> int:
    """len(skipped_images()): the number to log in the training metrics."""
    with _SKIPPED_LOCK:
        return len(_SKIPPED)


def clear_skipped_images() -> None:
    """Empties `skipped_images()` (for tests)."""
    with _SKIPPED_LOCK:
        _SKIPPED.clear()
