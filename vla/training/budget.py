"""``trainer.time_budget_s``: end training within a wall-clock budget by shortening the schedule.

A GPU run that must fit a slot ("train for 4 minutes") cannot know its step count in advance: it
depends on the machine, the model and the data. `TimeBudget` times ``probe`` steps after ``warm``
untimed ones (compilation, allocator warm-up), then sets the total step count so that the whole run
(from the start of the loop) ends inside the budget; the cosine schedule then spans the new total.
``trainer.steps`` stays the upper bound. It only shortens, once, early (during the LR warm-up, so the
learning rate already used does not depend on the total). The probe sits in the middle of the warm-up
(from a quarter of it, for half of it; at least steps 10-30): the first steps of a GPU run are slower than
the rest (allocator, kernel autotuning), and a probe at steps 10-30 of a 300-step warm-up ended an H200
run at 113 s of its 156 s budget (3.9 steps/s probed, ~5.8 after). A probe can also be optimistic (a CPU run
probed 4.94 steps/s and ran at 4.53, ending 38 s past its budget), so after the probe the budget is also a
deadline: every ``check_every`` steps the run's wall time is compared with the whole budget, and once it is
spent training stops at that step (the checkpoint is saved as at any end; the cosine schedule is then in its tail).

A 20-step probe on a shared 2-core machine misjudges the rate by up to ~15 % either way (the same run probed
5.47 and 5.96 steps/s for its two seeds, and the main job 4.32 against 4.8 over its whole run), so the plan is
made once more from a longer window: ``refine`` (default a tenth of the first plan, at least ``probe``) steps
after the probe, the rate over that window sets the total again, longer or shorter, up to ``trainer.steps``.
The cosine schedule then spans the new total: at a tenth of the run, a 10 % longer total moves the learning
rate by ~0.3 % of its peak.
"""

from __future__ import annotations

import time

from vla.training import distributed as dist_utils


class TimeBudget:
    def __init__(self, budget_s: float, start_step: int, warm: int = 10, probe: int = 20, margin: float = 0.97,
                 check_every: int = 25) -> None:
        if budget_s <= 0:
            raise ValueError(f"trainer.time_budget_s must be > 0 seconds, got {budget_s}")
        self.budget_s, self.margin, self.check_every = float(budget_s), margin, max(1, int(check_every))
        self.spent = False  # the deadline ended the run (not the probe's step count)
        self.t_run = time.perf_counter()
        self.probe_from, self.probe_to = start_step + warm, start_step + warm + probe
        self.t_probe: float | None = None
        self.done = False  # the first plan is made (the probe has ended)
        self.refine_at: int | None = None  # the step of the second plan (None: made, or not due yet)
        self.cap: int | None = None  # trainer.steps: no plan goes past it
        self.rate = self.fit = self.first_rate = None

    @classmethod
    def from_config(cls, tcfg, resume_dir) -> TimeBudget | None:
        budget = tcfg.get("time_budget_s")
        if budget is None:
            return None
        if resume_dir is not None:
            raise ValueError("trainer.time_budget_s cannot be combined with resume: the schedule of the run being "
                             "resumed is fixed by its step count; resume with trainer.steps=<the run's total> instead")
        if tcfg.get("stop_at") is not None:
            raise ValueError("trainer.time_budget_s and trainer.stop_at both set: use one of them")
        warmup = int(tcfg.get("warmup_steps") or 0)
        return cls(float(budget), 0, warm=max(10, warmup // 4), probe=max(20, warmup // 2))

    def after_step(self, step: int, info: dist_utils.DistInfo, total_steps: int) -> int | None:
        """Call after every optimizer step (``step`` = steps done). Returns a new total: when the probe ends and
        the budget needs fewer than ``total_steps``; when the longer second window ends and it gives another total
        (either way, at most the first call's ``total_steps``); and ``step`` itself (stop now, ``spent``) if the
        whole budget is gone before the planned end; else None."""
        if self.cap is None:
            self.cap = total_steps
        if self.done:
            if self.refine_at is not None and step >= self.refine_at and not self.spent:
                return self._refine(step, info, total_steps)
            if self.spent or step % self.check_every or step >= total_steps:
                return None
            over = float(time.perf_counter() - self.t_run > self.budget_s)
            if dist_utils.all_reduce_mean(info, {"over": over})["over"] > 0:  # any rank over: all stop here
                self.spent = True
                return step
            return None
        if step == self.probe_from:
            dist_utils.barrier(info)
            self.t_probe = time.perf_counter()
            return None
        if step < self.probe_to or self.t_probe is None:
            return None
        self.done = True
        now = time.perf_counter()
        rate = (self.probe_to - self.probe_from) / max(now - self.t_probe, 1e-9)  # steps/s
        fit = self._fit(step, rate, now, info)
        self.rate, self.fit = rate, fit
        window = max(self.probe_to - self.probe_from, min(fit, total_steps) // 10)
        if step + window < min(fit, total_steps):
            self.refine_at, self.t_refine_from, self.refine_from = step + window, now, step
        return fit if fit < total_steps else None

    def _fit(self, step: int, rate: float, now: float, info: dist_utils.DistInfo, cap: int | None = None) -> int:
        """The total step count that ends inside the budget at ``rate`` steps/s (at most ``cap``); ranks agree."""
        fit = step + max(1, int((self.budget_s * self.margin - (now - self.t_run)) * rate))
        fit = fit if cap is None else min(cap, fit)
        return int(dist_utils.all_reduce_mean(info, {"fit": float(fit)})["fit"])

    def _refine(self, step: int, info: dist_utils.DistInfo, total_steps: int) -> int | None:
        """The second plan, from the rate over the steps since the probe."""
        self.refine_at = None
        now = time.perf_counter()
        rate = (step - self.refine_from) / max(now - self.t_refine_from, 1e-9)
        fit = self._fit(step, rate, now, info, cap=self.cap)
        self.first_rate, self.rate, self.fit = self.rate, rate, fit
        return fit if fit != total_steps else None
