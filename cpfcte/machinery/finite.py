"""Non-finite losses stop a run instead of being trained on (stage 1 and DeepLabv2).

Inside the step nothing is read back to the host: each step folds ``isfinite(loss)`` into a
device tensor holding the first bad step (``FiniteGuard.step``); before a checkpoint is written
(every epoch, every ``ckpt_every`` DeepLabv2 iterations) the guard is read once, together with
the weights' finiteness, and a bad interval raises ``NonFiniteError`` naming run, epoch and
step. The checkpoint of that interval is then never written: the last good one stays, and the
run is never marked complete. With ``skip_nonfinite=true`` a non-finite step is skipped instead
(its gradients dropped; this reads the loss back every step) and counted in the log.
"""

from __future__ import annotations

import torch

from cpfcte.machinery.errors import CpfcteError


class NonFiniteError(CpfcteError):
    pass


class FiniteGuard:
    def __init__(self, device: torch.device, run: str, unit: str, skip: bool = False,
                 world: int = 1):
        self.run, self.unit, self.skip, self.world = run, unit, skip, world
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.index = torch.zeros((), dtype=torch.long, device=device)   # the step, filled in
        self.skipped = 0                                                # place: no copy

    def step(self, loss: torch.Tensor, index: int) -> bool:
        """Record step ``index``'s loss; False when the step must be skipped (skip mode)."""
        finite = torch.isfinite(loss.detach())
        if self.skip and self.world > 1:             # every rank skips the same steps
            agreed = finite.to(torch.int32)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
            finite = agreed.bool()
        if self.skip:
            if not bool(finite):
                self.skipped += 1
                return False
            return True
        self.index.fill_(index)                 # a kernel argument, not a host-to-device copy
        self.first_bad = torch.where((self.first_bad < 0) & ~finite, self.index, self.first_bad)
        return True

    def check(self, model: torch.nn.Module, where: str, world: int = 1) -> None:
        """Raise when a recorded loss or a weight is not finite (one read per interval)."""
        bad = self.first_bad.clone()
        weights_ok = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
        flags = torch.stack([bad.float(), (~weights_ok).float()])
        if world > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        first, weights_bad = int(flags[0]), bool(flags[1])
        self.first_bad.fill_(-1)
        if first >= 0 or weights_bad:
            what = (f"non-finite loss at {self.unit} {first + 1}" if first >= 0
                    else "non-finite weights")
            raise NonFiniteError(
                f"{self.run}: {what} ({where}); training stopped, the last good checkpoint is "
                "kept and the run is not complete. Lower the learning rate, or pass "
                "skip_nonfinite=true to skip such steps (counted in the log)")
