"""Online EWC (Schwarz et al. 2018; Huszár 2018) as van de Ven & Tolias 2019 run it: one running Fisher
F ← F_t + γ F and one anchor θ* (the parameters after the last task), penalty λ/2 · Σ_i γ F_i (θ_i − θ*_i)² (the
2019 code applies γ again to the stored sum in ewc_loss). The Fisher is EWC's (ewc.py)."""
from __future__ import annotations

from . import METHODS
from .ewc import EWC
from .schemas import OnlineEWCConfig


@METHODS.register("online_ewc", OnlineEWCConfig)
class OnlineEWC(EWC):
    online = True

    def store(self, f_buf, f) -> None:
        f_buf[0] = f + self.hp.gamma * f_buf[0]  # zero before the first task

    def fold(self, n: int) -> None:
        for P, mu, f_buf, a_buf in zip(self.prec.list(), self.centre.list(), self.fisher.list(), self.anchor.list()):
            P.copy_(self.hp.gamma * f_buf[0])
            mu.copy_(a_buf[0])
        self.const.zero_()
