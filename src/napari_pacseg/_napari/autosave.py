"""Work never lost: after each training the widget saves the scribbles it trained from, the
model and its own settings into a session folder; *Restore session* brings them back after a
crash or a restart.

A session folder holds ``session.json`` (the record: what is where, the settings),
``model.safetensors`` and one ``scribbles-<i>.npy`` per trained image. Every file is written
whole (temporary file, then rename), the record last, so a folder always holds one complete
session. The folder of an image read from a file is ``<file stem>.pacseg-session`` beside that
file when its folder can be written, else ``<user data folder>/sessions/<image name>``. A
folder that exists without pacseg's record (a user's own folder of that name) is never written
into: the user data folder is used instead.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_pacseg.io.atomic import write_bytes, write_json
from napari_pacseg.io.model_file import load_model, save_model
from napari_pacseg.model.network import PacSegModel

SESSION_FORMAT = "napari-pacseg-session"
SESSION_VERSION = 1
RECORD = "session.json"
MODEL = "model.safetensors"
SUFFIX = ".pacseg-session"


def user_sessions_dir() -> Path:
    """``<user data folder>/sessions`` (``platformdirs``: ``~/.local/share/napari-pacseg`` on
    Linux, honouring ``XDG_DATA_HOME``)."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("napari-pacseg", appauthor=False)) / "sessions"


def _safe(name: str) -> str:
    """``name`` reduced to characters safe in a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"


def is_session(folder) -> bool:
    """True when ``folder`` holds pacseg's session record."""
    try:
        record = json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("format") == SESSION_FORMAT


def _usable(folder: Path) -> bool:
    """``folder`` is pacseg's session folder, or can become one (absent, in a writable parent)."""
    if folder.exists():
        return folder.is_dir() and is_session(folder) and os.access(folder, os.W_OK | os.X_OK)
    parent = folder.parent
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)


def session_folder(image_name: str, source=None) -> Path:
    """Where the session of the image ``image_name`` goes: beside its file ``source`` (when
    given and usable), else in ``user_sessions_dir()``; a user's folder of the same name is
    never taken (``<name>-2``, ... instead)."""
    if source is not None:
        source = Path(source)
        beside = source.parent / f"{source.stem if source.is_file() else source.name}{SUFFIX}"
        if _usable(beside):
            return beside
    base = user_sessions_dir() / _safe(image_name)
    folder, n = base, 1
    while not _usable(folder):
        if not folder.exists():  # the data folder itself cannot be made: let the save say so
            return folder
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


@dataclass(frozen=True)
class SessionScribbles:
    """One trained image's scribbles: the image layer's name, the labels ``data`` (uint8, the
    image's spatial shape), the layer's ``scale`` and the class names."""

    image: str
    data: np.ndarray
    scale: tuple[float, ...]
    classes: list[str]


@dataclass(frozen=True)
class SavedSession:
    """A session read back: its folder, model, scribbles, the widget's settings (a dict of
    control names to values) and when it was saved."""

    folder: Path
    model: PacSegModel
    scribbles: list[SessionScribbles]
    settings: dict
    saved: str


def save_session(folder, model: PacSegModel, scribbles: list[SessionScribbles], settings: dict) -> Path:
    """Write a session into ``folder`` (created; only pacseg's own files in it are replaced):
    the model, each scribbles array, then the record. Returns the folder. ``OSError`` when it
    cannot be written; ``ValueError`` when ``folder`` is not pacseg's."""
    folder = Path(folder)
    if folder.exists() and not is_session(folder):
        raise ValueError(f"{folder} exists and is not a pacseg session folder; it is left alone")
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder / MODEL)
    entries = []
    for i, s in enumerate(scribbles):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(s.data, np.uint8), allow_pickle=False)
        name = f"scribbles-{i}.npy"
        write_bytes(folder / name, buf.getvalue())
        entries.append({"file": name, "image": s.image, "scale": [float(v) for v in s.scale],
                        "classes": list(s.classes)})  # fmt: skip
    for old in folder.glob("scribbles-*.npy"):  # a previous session's extra images
        if old.name not in {e["file"] for e in entries}:
            old.unlink(missing_ok=True)
    write_json(folder / RECORD, {
        "format": SESSION_FORMAT, "version": SESSION_VERSION,
        "saved": time.strftime("%Y-%m-%d %H:%M:%S"), "model": MODEL, "scribbles": entries,
        "settings": settings,
    })  # fmt: skip
    return folder


def read_session(folder) -> SavedSession:
    """The session in ``folder``; ``ValueError`` saying what is wrong when it is not one (or is
    damaged). The model is read with every check of ``load_model``; the scribbles without
    pickles."""
    folder = Path(folder)
    if not is_session(folder):
        raise ValueError(
            f"{folder} holds no pacseg session ({RECORD} missing or not pacseg's); choose a "
            f"'*{SUFFIX}' folder or one under {user_sessions_dir()}"
        )
    record = json.loads((folder / RECORD).read_text())
    if record.get("version", 0) > SESSION_VERSION:
        raise ValueError(f"{folder}: a session of a newer napari-pacseg; update to restore it")
    try:
        model = load_model(folder / record["model"])
        scribbles = []
        for e in record["scribbles"]:
            data = np.load(folder / Path(e["file"]).name, allow_pickle=False)
            scribbles.append(SessionScribbles(str(e["image"]), data,
                                              tuple(float(v) for v in e["scale"]),
                                              [str(c) for c in e["classes"]]))  # fmt: skip
    except (KeyError, TypeError, OSError) as err:
        raise ValueError(f"{folder}: the session is damaged ({err}); nothing was restored") from None
    settings = record.get("settings")
    return SavedSession(folder, model, scribbles, settings if isinstance(settings, dict) else {},
                        str(record.get("saved", "")))  # fmt: skip
