"""Checkpoints of a running reconstruction, and resuming from them.

A checkpoint is written after every SVR cycle, every ``run.checkpoint_every`` steps of the fit and
joint stages and when the refine stage ends (rounded up to a multiple of ``model.knn_every``, so the neighbour index is rebuilt exactly
where the uninterrupted run rebuilds it). It holds everything the remaining steps depend on: slice
motions, weights, the Gaussian field, optimiser and scheduler states, random-generator states and the
log so far. Resuming from it gives the same result as the uninterrupted run with the same seed
(bit for bit on CPU). Each file is written under a temporary name and renamed, so an interruption
while writing leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from gsvr.errors import GsvrError
from gsvr.io.nifti import Stack, atomic_output

log = logging.getLogger(__name__)

#: Settings of the ``run`` section that may differ between the interrupted and the resumed run.
_FREE = {"device", "checkpoint_every"}


def fingerprint(stacks: Sequence[Stack], config: dict) -> str:
    """Hash of the (preprocessed) stacks and the settings that shape the result."""
    h = hashlib.sha256()
    for s in stacks:
        for a in (s.data, s.mask, s.affine):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(repr(s.thickness_mm).encode())
    shaping = {**config, "run": {k: v for k, v in config.get("run", {}).items() if k not in _FREE}}
    h.update(repr(sorted(shaping.items())).encode())
    return h.hexdigest()


class Checkpointer:
    """Writes checkpoints to ``path`` and hands a loaded one to the stage it belongs to."""

    def __init__(self, path: str | os.PathLike | None, every: int, knn_every: int, *, resume: bool,
                 stages: Sequence[str]) -> None:
        """``stages``: the names of the pipeline's stages in the order they run (a checkpoint of a later
        stage skips the earlier ones)."""
        self.stages = tuple(stages)
        self.path = Path(path) if path else None
        self.every = 0 if every <= 0 else knn_every * -(-every // knn_every)
        self.loaded: dict | None = None
        self.fingerprint = ""
        if resume and self.path is None:
            raise GsvrError("--resume needs --checkpoint PATH")
        if resume and self.path.is_file():
            try:
                self.loaded = torch.load(self.path, map_location="cpu", weights_only=False)
            except Exception as exc:  # torch raises several types for a damaged file
                raise GsvrError(f"{self.path}: cannot read checkpoint ({exc.__class__.__name__}: {exc})") from exc
            log.info("resuming from %s (stage %s, step %d)", self.path, self.loaded["stage"], self.loaded["step"])
        elif resume:
            log.info("no checkpoint at %s: starting from the beginning", self.path)

    @property
    def active(self) -> bool:
        return self.path is not None

    def check(self, fp: str) -> None:
        """Remember the run's fingerprint; a loaded checkpoint must have been written for the same one."""
        self.fingerprint = fp
        if self.loaded is not None and self.loaded["fingerprint"] != fp:
            raise GsvrError(f"{self.path}: checkpoint was written for other stacks or settings; remove it or drop --resume")

    def resumes(self, stage: str) -> dict | None:
        """The loaded state when it belongs to ``stage``."""
        return self.loaded if self.loaded is not None and self.loaded["stage"] == stage else None

    def skips(self, stage: str) -> bool:
        """True when the loaded checkpoint is from a stage after ``stage``."""
        return self.loaded is not None and self.stages.index(self.loaded["stage"]) > self.stages.index(stage)

    def due(self, step: int) -> bool:
        return self.active and self.every > 0 and step % self.every == 0

    def save(self, stage: str, step: int, **state) -> None:
        if not self.active:
            return
        state.update(stage=stage, step=step, fingerprint=self.fingerprint,
                     torch_rng=torch.get_rng_state())
        with atomic_output(self.path) as tmp:
            torch.save(state, tmp)

    def finish(self) -> None:
        """The run completed: its checkpoint is no longer needed."""
        if self.active and self.path.is_file():
            self.path.unlink()
