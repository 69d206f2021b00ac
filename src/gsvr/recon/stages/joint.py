"""Stage joint: optimise the Gaussian field, slice motions, slice scales and slice weights on the slices.

Optionally first on the slices downsampled 2x in plane (GaussianSVR's multi-resolution), then at full
resolution for ``joint.steps`` steps. The optional components (progressive grid, density control,
residual field) are strategies (:mod:`gsvr.recon.strategies`) whose hooks the loop calls.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from gsvr.model.field import GaussianField
from gsvr.recon.config import JointConfig
from gsvr.recon.forward import Neighbours, current_positions, render_slices
from gsvr.recon.losses import SliceImages, pixel_loss, regularise, slice_image_terms
from gsvr.recon.slices import SliceData, SliceMotion, build_slice_data, downsample_inplane, motion_about_centres
from gsvr.recon.state import ReconState, log_peak_memory, robust_slice_weights
from gsvr.recon.strategies import Densify, Progressive, ResidualFieldStrategy, Strategy

NAME = "joint"
log = logging.getLogger(__name__)


def run(state: ReconState, cfg: JointConfig) -> ReconState:
    resume = state.ck.resumes(NAME)
    train_motion = state.cfg.motion and cfg.motion
    if cfg.multires and resume is None:
        state.weights = _coarse_phase(state, cfg, train_motion)
    strategies: list[Strategy] = []
    if state.progressive is not None:
        strategies.append(Progressive(cfg.progressive, state.progressive))
    if cfg.densify:
        strategies.append(Densify(cfg.densify, state.field.n, cfg.steps, state.field.means.device))
    if cfg.residual_field and cfg.steps > 0:
        strategies.append(ResidualFieldStrategy(cfg.residual_field, state.field, cfg.steps))
    loop = JointLoop(state, state.field, state.motion, state.data, strategies, steps=cfg.steps, train_motion=train_motion)
    state.weights = loop.run(state.weights, resume=resume, checkpoint=True)
    if cfg.steps:
        log_peak_memory("the joint optimisation")
    return state


def _coarse_phase(state: ReconState, cfg: JointConfig, train_motion: bool) -> Tensor:
    """GaussianSVR's first level: ``multires.steps`` joint steps on the slices downsampled 2x in plane,
    then the motions, scales and weights carried back to the full-resolution slices (about their own
    centres). The residual field stays off here (fine detail). Not checkpointed: a resume inside it
    starts it again from the fit."""
    data, motion, weights = state.data, state.motion, state.weights
    coarse = build_slice_data([downsample_inplane(s) for s in state.stacks], quantile=state.cfg.preprocess.normalize_quantile,
                              device=data.x0.device, like=data)
    index = {key: i for i, key in enumerate(zip(data.stack_of_slice.tolist(), data.slice_in_stack.tolist()))}
    rows = torch.as_tensor([index[key] for key in zip(coarse.stack_of_slice.tolist(), coarse.slice_in_stack.tolist())],
                           device=data.x0.device)
    log.info("multi-resolution: %d coarse slices (%d pixels) for %d steps", coarse.n_slices, coarse.n_pixels, cfg.multires.steps)
    coarse_motion = SliceMotion(coarse.n_slices, data.x0.device)
    with torch.no_grad():
        for param, value in zip((coarse_motion.rotvec, coarse_motion.trans, coarse_motion.log_scale),
                                motion_about_centres(motion, data.centre, coarse.centre, rows)):
            param.copy_(value)
    strategies = [Densify(cfg.densify, state.field.n, cfg.multires.steps, state.field.means.device)] if cfg.densify else []
    loop = JointLoop(state, state.field, coarse_motion, coarse, strategies, steps=cfg.multires.steps, train_motion=train_motion)
    coarse_weights = loop.run(weights[rows])
    everything = torch.arange(coarse.n_slices, device=rows.device)
    with torch.no_grad():
        for param, value in zip((motion.rotvec, motion.trans, motion.log_scale),
                                motion_about_centres(coarse_motion, coarse.centre, data.centre[rows], everything)):
            param[rows] = value
    weights = weights.clone()
    weights[rows] = coarse_weights
    return weights


class JointLoop:
    """One phase of the joint optimisation: ``steps`` AdamW steps on the field, the slice scales and
    (``train_motion``) the slice motions of ``data``, with the strategies' hooks."""

    def __init__(self, state: ReconState, field: GaussianField, motion: SliceMotion, data: SliceData,
                 strategies: list[Strategy], *, steps: int, train_motion: bool) -> None:
        self.state, self.field, self.motion, self.data = state, field, motion, data
        self.cfg: JointConfig = state.cfg.joint
        self.model = state.cfg.model
        self.gen = state.gen
        self.strategies = strategies
        self.steps = steps
        self.train_motion = train_motion
        self.k = min(state.k, field.n)
        opt = self.cfg.optim
        if opt.schedule == "step":
            self.schedule = lambda it: opt.step_gamma ** (it // opt.step_size)
        else:
            self.schedule = lambda it: opt.cosine_final + (1 - opt.cosine_final) * 0.5 * (1 + math.cos(math.pi * min(it / steps, 1.0)))
        self.optimizer, self.scheduler = self._make_optimizer(0)

    def parameter_groups(self) -> list[dict]:
        opt = self.cfg.optim
        groups = [g for s in self.strategies for g in s.param_groups()]
        groups += self.field.param_groups(opt.lr) + [{"params": [self.motion.log_scale], "lr": opt.slice_scale}]
        if self.train_motion:
            groups += [{"params": [self.motion.rotvec], "lr": opt.rotation}, {"params": [self.motion.trans], "lr": opt.translation}]
        return groups

    def _make_optimizer(self, at: int):
        opt = torch.optim.AdamW(self.parameter_groups(), weight_decay=self.cfg.optim.weight_decay)
        sch = torch.optim.lr_scheduler.LambdaLR(opt, self.schedule)
        if at:  # continue the schedule at step ``at``
            sch.last_epoch = at
            for group, base in zip(opt.param_groups, sch.base_lrs):
                group["lr"] = base * self.schedule(at)
        return opt, sch

    def swap_field(self, new_field: GaussianField, at: int) -> None:
        """The field's Gaussians replaced (their Adam moments restart; the others' carry on)."""
        self.field.replace_with(new_field)
        kept = dict(self.optimizer.state)
        self.optimizer, self.scheduler = self._make_optimizer(at)
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if p in kept:
                    self.optimizer.state[p] = kept[p]
        for s in self.strategies:
            s.field_replaced(self)

    def run(self, weights: Tensor, *, resume: dict | None = None, checkpoint: bool = False) -> Tensor:
        """The phase's steps from ``resume`` (a joint checkpoint) or the start; returns the slice weights.
        ``checkpoint``: save a joint checkpoint after each due step but the last."""
        state, data, sw = self.state, self.data, self.state.cfg.slice_weights
        nbrs = Neighbours(self.cfg.block_query)
        loss = self.cfg.loss
        images = SliceImages(data) if loss.ssim_weight > 0 or loss.tv_weight > 0 else None
        slice_count = torch.bincount(data.slice_idx, minlength=data.n_slices).float()
        slice_abs_res = torch.zeros(data.n_slices, device=data.x0.device)
        start = 0
        if resume is not None:
            for s in self.strategies:
                s.load_state_dict(resume)
            self.optimizer.load_state_dict(resume["optimizer"])
            self.scheduler.load_state_dict(resume["scheduler"])
            slice_abs_res = resume["slice_abs_res"].to(data.x0.device)
            start = resume["step"]
        for it in range(start, self.steps):
            changed = False
            for s in self.strategies:
                changed = s.step_pre(it, self) or changed
            if it % self.model.knn_every == 0 or changed:
                nbrs.refresh(current_positions(data, self.motion), data.slice_idx, self.field.means, self.k,
                             self.model.knn_backend)
            if sw is not None and it > 0 and it % sw.every == 0:
                weights = robust_slice_weights(slice_abs_res / slice_count.clamp_min(1), sw)
            motion_on = self.train_motion and it >= self.cfg.motion_warmup
            self.optimizer.zero_grad(set_to_none=True)
            self.field.zero_grad(set_to_none=True)
            self.motion.zero_grad(set_to_none=True)
            residual = next((r for s in self.strategies if (r := s.residual(it, self)) is not None), None)
            render = render_slices(self.field, self.motion, data, nbrs, model=self.model, motion_on=motion_on,
                                   residual=residual)
            loss_value, slice_abs_res = slice_loss_backward(render, weights, self.cfg, self.gen, images)
            loss_value += regularise(self.field, self.motion, loss)
            for s in self.strategies:
                s.step_post_backward(it, self)
            self.optimizer.step()
            self.scheduler.step()
            state.record(NAME, loss_value)
            state.bar.update(1)
            state.bar.set_postfix(loss=f"{loss_value:.4f}")
            if checkpoint and it + 1 < self.steps and state.ck.due(it + 1):
                extra = {k: v for s in self.strategies for k, v in s.state_dict().items()}
                state.weights = weights
                state.save(NAME, it + 1, field=self.field.state(), optimizer=self.optimizer.state_dict(),
                           scheduler=self.scheduler.state_dict(), slice_abs_res=slice_abs_res, **extra)
        for s in self.strategies:
            s.finish(self)
        return weights


def slice_loss_backward(render, weights: Tensor, cfg: JointConfig, gen: torch.Generator,
                        images: SliceImages | None = None) -> tuple[float, Tensor]:
    """The weighted slice loss of one step over its pixel batch, back-propagated chunk by chunk.

    With whole-slice terms (``images``: SSIM, TV) the batch is made of whole slices, predicted once
    without a graph first (see :mod:`gsvr.recon.losses`). Returns the loss and each slice's summed
    absolute residual [S] (scaled up from the batch when it is a sample)."""
    data, chunk, loss = render.data, render.model.chunk_pixels, cfg.loss
    n_pix = data.n_pixels
    whole_slices = images is not None
    if cfg.batch_fraction < 1.0 and whole_slices:  # whole-slice terms: a batch of whole slices
        chosen = torch.zeros(data.n_slices, dtype=torch.bool)
        chosen[torch.randperm(data.n_slices, generator=gen)[: max(1, int(cfg.batch_fraction * data.n_slices))]] = True
        batch = torch.nonzero(chosen.to(data.x0.device)[data.slice_idx])[:, 0]
    elif cfg.batch_fraction < 1.0:
        batch = torch.randperm(n_pix, generator=gen)[: max(1, int(cfg.batch_fraction * n_pix))].to(data.x0.device)
    else:
        batch = None
    total_w = (weights[data.slice_idx] if batch is None else weights[data.slice_idx[batch]]).sum()
    abs_res = torch.zeros(data.n_slices, device=data.x0.device)
    loss_total = 0.0
    n_batch = n_pix if batch is None else len(batch)
    chunks = [slice(start, start + chunk) if batch is None else batch[start : start + chunk] for start in range(0, n_batch, chunk)]
    if whole_slices:  # a pass without graph, then the whole-slice terms' gradient joins each chunk's loss
        with torch.no_grad():
            pred_all = torch.cat([render.predict(sel) for sel in chunks])
        y_batch = data.y if batch is None else data.y[batch]
        value, slice_grad = slice_image_terms(images, pred_all, y_batch, batch, weights, ssim_weight=loss.ssim_weight,
                                              tv_weight=loss.tv_weight, window=loss.ssim_window)
        loss_total += value
    offset = 0
    for sel in chunks:
        sid = data.slice_idx[sel]
        pred = render.predict(sel)
        res = (pred - data.y[sel]).abs()
        term = res if loss.pixel == "l1" else pixel_loss(pred, data.y[sel], loss.pixel, loss.smooth_l1_beta)
        chunk_loss = (weights[sid] * term).sum() / total_w
        loss_total += chunk_loss.item()
        if whole_slices:
            chunk_loss = chunk_loss + (slice_grad[offset : offset + len(pred)] * pred).sum()
            offset += len(pred)
        chunk_loss.backward()
        abs_res.index_add_(0, sid, res.detach())
    render.backward()
    if batch is not None:  # slices' mean residual from the sampled pixels only
        counts = torch.bincount(data.slice_idx[batch], minlength=data.n_slices).float()
        full = torch.bincount(data.slice_idx, minlength=data.n_slices).float()
        abs_res = abs_res * full / counts.clamp_min(1)
    return loss_total, abs_res
