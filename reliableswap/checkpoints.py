"""Reading torch checkpoint files that may come from anywhere, in bounded memory.

``torch.load(weights_only=True)`` runs no pickled code, but it inflates every member of the zip
archive a ``.pth``/``.pt`` file is: a 1 MB file whose stored tensor is 1 GiB of deflated zeros
allocates 1 GiB. :func:`torch_load` reads the archive's directory first and refuses a file whose
members declare more bytes than the file can honestly hold (``torch.save`` stores members
uncompressed), or more than the caller expects (the architecture's own size), before loading.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from triplets.jsonl import UnreadableFile, open_regular
from reliableswap.errors import UserError

#: Slack over the file's own size that the members' declared sizes may add up to.
SLACK_BYTES = 64 << 20


class CheckpointRefused(UserError):
    """A checkpoint refused before loading; ``str(err)`` is one line naming the file."""


def declared_bytes(path: str | os.PathLike) -> int | None:
    """Sum of the uncompressed sizes a zip-format checkpoint declares (None: not a zip archive)."""
    with open_regular(path) as f:
        if not zipfile.is_zipfile(f):
            return None
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as z:
                return sum(i.file_size for i in z.infolist())
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise CheckpointRefused(f"{os.fspath(path)}: not a readable checkpoint (broken zip directory: {e})") from None


def check_archive(path: str | os.PathLike, expected_bytes: int | None = None) -> None:
    """Refuse (:class:`CheckpointRefused`) a checkpoint whose members would inflate past its own
    size (plus :data:`SLACK_BYTES`), or past ``expected_bytes`` (× 2, plus slack) when given. A
    special file (FIFO, device) is refused too."""
    path = Path(path)
    try:
        size = os.stat(path).st_size
        total = declared_bytes(path)
    except UnreadableFile as e:
        raise CheckpointRefused(str(e)) from None
    if total is None:
        return
    if total > size + SLACK_BYTES:
        raise CheckpointRefused(f"{path}: refused: its archive declares {total / 2**20:.0f} MiB uncompressed in a "
                                f"{size / 2**20:.1f} MiB file (a compressed bomb; torch.save writes members uncompressed)")
    if expected_bytes is not None and total > 2 * expected_bytes + SLACK_BYTES:
        raise CheckpointRefused(f"{path}: refused: its archive declares {total / 2**20:.0f} MiB, the architecture "
                                f"needs {expected_bytes / 2**20:.0f} MiB")


def first_sentence(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text.split(". ")[0][:160] if text else type(e).__name__).rstrip(".")


def torch_load(path: str | os.PathLike, expected_bytes: int | None = None, **kw: Any) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` after :func:`check_archive`; a
    file holding pickled objects other than tensors and containers, or not a torch file at all, is
    refused (:class:`CheckpointRefused`, one line naming it)."""
    check_archive(path, expected_bytes)
    try:
        return torch.load(path, map_location=kw.pop("map_location", "cpu"), weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        text = " ".join(str(e).split())
        found = re.search(r"WeightsUnpickler error: (.+?)(?: Check the documentation|$)", text) or \
            re.search(r"source\. (.+?)(?: Check the documentation|$)", text)
        what = found.group(1).strip().rstrip(".")[:160] if found else first_sentence(e)
        raise CheckpointRefused(f"{path}: refused: it holds pickled objects that are not plain tensors ({what})") from None
    except OSError:
        raise  # the file itself could not be read: the operating system's one line
    except Exception as e:  # noqa: BLE001 — torch.load parsing untrusted bytes fails in many ways (IndexError, KeyError, struct…)
        raise CheckpointRefused(f"{path}: not a readable checkpoint ({type(e).__name__}: {first_sentence(e)})") from None


def check_state(sd: dict[str, torch.Tensor], model: torch.nn.Module, path: str | os.PathLike,
                error: type[Exception] = CheckpointRefused) -> None:
    """``error`` on the first missing, unexpected or wrongly shaped key of ``sd`` against ``model``."""
    want = model.state_dict()
    for k, t in want.items():
        if k not in sd and k.endswith("num_batches_tracked"):
            continue  # a training counter (files converted from TensorFlow lack it; torch fills it on load)
        if k not in sd:
            raise error(f"{path}: key {k!r} missing ({len(set(want) - set(sd))} of {len(want)} expected keys missing): not this architecture")
        if tuple(sd[k].shape) != tuple(t.shape):
            raise error(f"{path}: key {k!r} has shape {tuple(sd[k].shape)}, the architecture needs {tuple(t.shape)}")
    extra = sorted(set(sd) - set(want))
    if extra:
        raise error(f"{path}: unexpected key {extra[0]!r} ({len(extra)} keys the architecture does not have)")


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s state dict (what a checkpoint of it holds)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
