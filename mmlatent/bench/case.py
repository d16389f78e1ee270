"""A benchmark case: one op at one shape, mmlatent's call and the baselines timed next to it in the same run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

# The implementation name of mmlatent's own call in every row; the baselines' speed-ups are relative to it.
MMLATENT = "mmlatent"

# A baseline named "floor: ..." is a lower bound measured in the same run, not a competitor: the table says how
# close mmlatent comes to it.
FLOOR_PREFIX = "floor: "

Inputs = dict
Call = Callable[[Inputs], object]
Make = Callable[[torch.device, torch.dtype], Inputs]  # make(device, dtype): fresh inputs of one case


@dataclass
class Case:
    """One row group of the benchmark table.

    Attributes:
        op: the op's name as the tables print it; result files and docs are compared by ``op`` and ``shape``, so
            both stay fixed once published.
        shape: the shape label, e.g. ``"B1 Hq4 Hkv2 M64 N64 D32 Ni16"``.
        make: ``make(device, dtype)`` builds fresh inputs (a dict of tensors and settings): every timed series and
            every memory measurement gets its own, so in-place ops never see a previous call's output. ``dtype`` is
            the activations' float dtype; indices and masks keep their own.
        ours: mmlatent's call on those inputs.
        baselines: name -> call, in table order; each does the same work as ``ours`` another way.
        flops: floating-point operations of one call (0: not compute-bound; see ``mmlatent.bench.ceilings``).
        bytes_moved: bytes one call must read and write at least (0: not bandwidth-bound).
        repeats: timed runs for this case instead of ``--repeats`` (whole-model rows take fewer).
    """

    op: str
    shape: str
    make: Make
    ours: Call
    baselines: Dict[str, Call]
    flops: float = 0.0
    bytes_moved: float = 0.0
    repeats: Optional[int] = None

    def implementations(self) -> List[str]:
        """The implementation names of the case's rows, mmlatent first."""
        return [MMLATENT, *self.baselines]


def implementation(case: Case, name: str) -> Call:
    """The call that implementation ``name`` (``"mmlatent"`` or a baseline's name) of ``case`` runs."""
    if name == MMLATENT:
        return case.ours
    if name not in case.baselines:
        raise ValueError(f"name: {case.op} [{case.shape}] has no implementation {name!r}; it has "
                         f"{', '.join(case.implementations())}")
    return case.baselines[name]
