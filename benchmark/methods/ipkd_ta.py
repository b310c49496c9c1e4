"""ipkd_ta (IPKD with teacher assistants, Ozerov & Duong 2021): s_{k+1} teaches s_k.

Identical to ipkd (same a, T) except for who teaches, so a comparison isolates that choice:
L = CE(z_K, y) + sum_{k<K} [(1-a) CE(z_k, y) + a KD(z_k, z_{k+1}; T)].
"""

from benchmark.methods import register_method
from benchmark.methods.ipkd import IPKD


@register_method("ipkd_ta")
class IPKDTA(IPKD):
    description = "inplace KD with teacher assistants: each sub-model teaches the next smaller"
    plot_slot = 3

    def teacher_of(self, k: int, num_submodels: int) -> int:
        return k + 1
