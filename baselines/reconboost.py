"""ReconBoost (Hua et al., ICML 2024): alternating boosting of modality learners.

Ensemble F(x) = beta * sum_m f_m(x_m), with f_m = the model's per-modality prediction
`out.logits[m]` and beta a learnable boost rate (init 1). Stage t trains the modality
m_t = modalities[t mod M] (audio, visual, ... in spec order). Phase 1 (boosting with reconcilement)
trains f_{m_t} alone with the per-sample weighted CE
    l = -(w1 - w2 * q_y) * log p_y / C,  p = softmax(f_{m_t}),  q = softmax(beta * sum_{m != m_t} f_m)
(q without gradient), the official code's form of the paper's KL reconcilement term
(huacong/ReconBoost train.py @14ab57a). Phase 2 (global rectification) trains every learner, the
heads and beta with CE(F, y). Predictions are argmax F.
Budget: the stages live inside the shared trainer loop; each trainer epoch is one pass over the
training data, either a Phase-1 epoch (`boost_epochs` per stage) or a Phase-2 epoch
(`correct_epochs` per stage), so ReconBoost gets exactly `trainer.epochs` passes like every other
method (official CREMA-D: 4 + 4 epochs per stage for ~100 stages = ~800 passes).
Deviations, all stated: the learners use the model's heads (separate per modality under late/sum
fusion) instead of the official shared 2-layer head, which would need equal encoder widths; the
official code builds new SGD optimizers each phase, replicated by clearing the trainer optimizer's
state at each phase start (`reset_optimizer`); the official memory-consolidation term is detached
on both sides (zero gradient), so `ga_weight=0` is the official behaviour and `ga_weight>0` the
intended one (gradient through the current learner, target = previous stage's learner); the
pretrained unimodal warm start is not used; the trainer's LR schedule replaces the per-stage decay.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from g2d.methods.base import Method
from g2d.registry import register_method


@dataclass
class ReconBoostParams:
    w1: float = 5.0  # official CREMA-D weight1 (MSA datasets: 1.0)
    w2: float = 1.0  # official CREMA-D weight2 (MSA datasets: 0.25)
    boost_epochs: int = 1  # Phase-1 epochs per stage (official 4; BalanceBenchmark 1)
    correct_epochs: int = 1  # Phase-2 epochs per stage (official 4; BalanceBenchmark 1)
    learn_beta: bool = True  # official: boost rate is a learnable scalar
    reset_optimizer: bool = True  # official: fresh optimizer (momentum) at every phase
    ga_weight: float = 0.0  # memory consolidation; 0 = official (its term has zero gradient)


def reconcile_loss(logits: torch.Tensor, others: torch.Tensor, y: torch.Tensor, w1: float, w2: float,
                   beta: torch.Tensor | float = 1.0):
    """Boosting loss with reconcilement (ReconBoost Eq. of Phase 1, code form, spec §6.1); returns (loss, q_y)."""
    q_y = torch.softmax(beta * others.detach().float(), 1).gather(1, y[:, None])[:, 0]
    logp_y = torch.log_softmax(logits.float(), 1).gather(1, y[:, None])[:, 0]
    return (-(w1 - w2 * q_y) * logp_y).mean() / logits.shape[1], q_y


@register_method("reconboost")
class ReconBoost(Method):
    Params = ReconBoostParams
    tasks = ("classification",)

    def __init__(self, params, spec):
        super().__init__(params, spec)
        if spec.task not in self.tasks:
            raise ValueError(f"reconboost supports classification only; dataset {spec.name} is {spec.task} "
                             "(remove reconboost from suite.methods for it)")
        if params.boost_epochs < 1 or params.correct_epochs < 0:
            raise ValueError("methods.reconboost: boost_epochs must be >= 1 and correct_epochs >= 0 (params.yaml)")
        self.beta = torch.ones((), requires_grad=params.learn_beta)
        self._beta_opt = None
        self._beta_opt_state = None
        self._phase = None  # (stage, phase) of the last step: a change resets the optimizer

    def schedule(self, epoch: int) -> tuple[int, int, str | None]:
        """(stage, phase, active modality); phase 2 has no single active modality."""
        mods = self.modalities()
        stage, r = divmod(epoch, self.params.boost_epochs + self.params.correct_epochs)
        if r < self.params.boost_epochs:
            return stage, 1, mods[stage % len(mods)]
        return stage, 2, None

    def setup(self, model, ctx):
        self.beta = self.beta.detach().to(ctx.device).requires_grad_(self.params.learn_beta)

    def ensemble(self, out) -> torch.Tensor:
        """F = beta * sum_m f_m (spec §6.1)."""
        return self.beta.to(out.fused.device) * torch.stack([out.logits[m].float() for m in out.logits]).sum(0)

    def predict(self, out):
        return self.ensemble(out).detach()

    def _beta_optimizer(self, optimizer):
        if self._beta_opt is None:
            self._beta_opt = type(optimizer)([self.beta], **optimizer.defaults)
            if self._beta_opt_state is not None:
                self._beta_opt.load_state_dict(self._beta_opt_state)
                self._beta_opt_state = None
        self._beta_opt.param_groups[0]["lr"] = optimizer.param_groups[0]["lr"]  # follow the schedule
        return self._beta_opt

    def train_step(self, model, batch, optimizer, ctx):
        stage, phase, active = self.schedule(ctx.epoch)
        if self.params.reset_optimizer and self._phase is not None and (stage, phase) != self._phase:
            optimizer.state.clear()  # official: new SGD each phase, so momentum restarts
            self._beta_opt, self._beta_opt_state = None, None
        self._phase = (stage, phase)
        optimizer.zero_grad(set_to_none=True)
        y = batch["label"]
        mods = list(model.modalities)
        with ctx.autocast():
            if phase == 1:
                feats = {}
                for m in mods:  # inactive learners give q only: no graph through them
                    with torch.set_grad_enabled(m == active):
                        feats[m] = model.encoders[m](batch[m])
                out = model.head(feats)
                others = [out.logits[m] for m in mods if m != active]
                rest = torch.stack(others).sum(0) if others else torch.zeros_like(out.logits[active])
                boost, q_y = reconcile_loss(out.logits[active], rest, y, self.params.w1, self.params.w2,
                                            self.beta.detach())
                terms = {"boost": boost}
                if self.params.ga_weight > 0 and stage > 0:
                    prev = mods[(stage - 1) % len(mods)]
                    p_now = torch.softmax(out.logits[active].float(), 1)
                    p_prev = torch.softmax(out.logits[prev].float(), 1).detach()
                    terms["ga"] = self.params.ga_weight * F.mse_loss(p_now, p_prev)
                ctx.record(q_y=q_y.mean())
            else:
                out = model(batch)
                terms = {"rectify": F.cross_entropy(self.ensemble(out), y)}
        total = sum(terms.values())
        ctx.check_finite(total, terms)
        total.backward()
        if ctx.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip)
        optimizer.step()
        if phase == 2 and self.params.learn_beta:
            self._beta_optimizer(optimizer).step()
            self.beta.grad = None
        ctx.record(stage=stage, phase=phase, active=mods.index(active) if active else -1,
                   beta=self.beta.detach().clone())
        return {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}

    def state_dict(self):
        opt = self._beta_opt.state_dict() if self._beta_opt is not None else self._beta_opt_state
        opt = copy.deepcopy(opt)  # a snapshot: the live optimizer keeps updating its buffers in place
        return {"beta": self.beta.detach().cpu().clone(), "beta_opt": opt,
                "phase": list(self._phase) if self._phase is not None else None}

    def load_state_dict(self, state):
        self.beta = state["beta"].clone().to(self.beta.device).requires_grad_(self.params.learn_beta)
        self._beta_opt, self._beta_opt_state = None, state["beta_opt"]
        self._phase = tuple(state["phase"]) if state["phase"] is not None else None
