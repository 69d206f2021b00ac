"""Shared test helpers, importable from every test module (``pythonpath = ["tests"]`` in pyproject.toml).

Fixtures that wrap these (and need pytest's ``monkeypatch`` / ``tmp_path``) are in conftest.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from gsvr.io.nifti import Stack


def stack_from_simulated(s, name: str = "stack") -> Stack:
    """One simulated stack (uint8 mask) as an input :class:`Stack` (bool mask)."""
    return Stack(data=s.data, mask=s.mask > 0, affine=s.affine, thickness_mm=s.thickness_mm, name=name)


def stacks_from_simulation(sim, prefix: str = "s") -> list[Stack]:
    """All stacks of a :func:`gsvr.simulate.stacks.simulate_stacks` result, named ``{prefix}0``, ``{prefix}1``, ..."""
    return [stack_from_simulated(s, name=f"{prefix}{k}") for k, s in enumerate(sim.stacks)]


@contextmanager
def interrupted_at_save(monkeypatch, when: int | tuple[str, int]) -> Iterator[None]:
    """Within the block, ``Checkpointer.save`` raises KeyboardInterrupt right after writing one checkpoint:
    the ``when``-th save (int, counted from 1) or the save of ``(stage, step)``."""
    from gsvr.recon import checkpoint as ckmod

    original = ckmod.Checkpointer.save
    count = [0]

    def save(self, stage, step, **state):
        original(self, stage, step, **state)
        count[0] += 1
        if (count[0] == when) if isinstance(when, int) else ((stage, step) == tuple(when)):
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ckmod.Checkpointer, "save", save)
        yield


class Resumed(NamedTuple):
    state: dict  #: the checkpoint as the interruption left it
    result: Any  #: the resumed run's ReconResult
    path: Path  #: the checkpoint path (removed once the resumed run completed)


def interrupt_and_resume(stacks, cfg, path: Path, when: int | tuple[str, int], monkeypatch) -> Resumed:
    """Run ``reconstruct`` with a checkpoint at ``path``, interrupt it after the checkpoint ``when`` (see
    :func:`interrupted_at_save`; the interruption must happen), then resume it from that checkpoint."""
    import pytest
    import torch

    from gsvr.recon.engine import reconstruct

    with interrupted_at_save(monkeypatch, when), pytest.raises(KeyboardInterrupt):
        reconstruct(stacks, cfg, progress=False, checkpoint=str(path))
    state = torch.load(path, weights_only=False)
    resumed = reconstruct(stacks, cfg, progress=False, checkpoint=str(path), resume=True)
    return Resumed(state=state, result=resumed, path=Path(path))
