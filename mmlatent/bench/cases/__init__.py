"""The benchmark's cases, one module per op family (attention, selection, losses, diffusion) and per method
(diffusion_head, ivtlr) and per Hugging Face integration (causal_lm). Each module has ``cases(sizes) -> List[Case]`` for every shape set of ``SIZES``; adding
a case is a constructor call in its module's ``cases``, and a new module is one entry of ``FAMILIES``."""
from __future__ import annotations

from typing import List

from ..case import Case
from . import attention, causal_lm, diffusion, diffusion_head, ivtlr, losses, selection

# default: the CPU set (what `make demo` and `make bench` run); gpu: real sizes; tiny: every op and baseline in
# seconds on a CPU (the smoke test).
SIZES = ("default", "tiny", "gpu")

# Table order: the ops from the lowest level up, then the methods built on them (the default set's rows keep the
# order of the committed CPU results).
FAMILIES = (attention, selection, losses, diffusion, ivtlr, diffusion_head, causal_lm)


def cases_for(sizes: str) -> List[Case]:
    """Every case of the shape set ``sizes`` (one of ``SIZES``), in table order; indices into this list name a
    case across processes (the CPU memory probe), so it is rebuilt the same way each time."""
    if sizes not in SIZES:
        raise ValueError(f"sizes: expected one of {', '.join(SIZES)}, got {sizes!r}")
    return [case for family in FAMILIES for case in family.cases(sizes)]


__all__ = ["SIZES", "FAMILIES", "cases_for"]
