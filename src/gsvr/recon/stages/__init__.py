"""The reconstruction as a pipeline of stages, each ``run(state, section) -> state``.

    prepare -> align -> slices -> svr -> init -> fit -> refine -> joint -> sample

``section`` is the stage's part of :class:`gsvr.recon.config.ReconConfig` (``state.cfg`` holds the
whole). The svr, fit, refine and joint stages write checkpoints; on resume, a stage whose checkpoint a later
stage's superseded is skipped, and the shared state is restored by the slices stage.
"""

from gsvr.recon.stages import align, fit, init, joint, prepare, refine, sample, slices, svr

#: (stage module, the config section it receives), in order.
PIPELINE = ((prepare, "preprocess"), (align, "align"), (slices, "run"), (svr, "svr"), (init, "init"),
            (fit, "fit"), (refine, "refine"), (joint, "joint"), (sample, "output"))

__all__ = ["PIPELINE"]
