"""How a kernel module declares what ``python -m mmlatent.kernels.compile_check`` compiles: one
:class:`CompileCase` per shipped launch configuration, built next to the kernel from the kernel's own parameter
list, so a signature is never retyped as strings. Imports nothing from triton.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Sequence, Tuple


@dataclass(frozen=True)
class CompileCase:
    """One kernel specialisation to compile for sm_90a.

    ``types`` gives the Triton type of every pointer and float argument (e.g. ``{"Q": "*bf16", "eps": "fp32"}``);
    every other runtime argument is an ``i32``. ``constexprs`` sets every constexpr parameter. ``unit`` names the
    integer arguments the launcher sees as 1 (unit strides), ``aligned`` those it sees as multiples of 16: Triton's
    launcher specialises real launches on both, so a compile without them would measure a kernel that never runs.
    """

    name: str
    kernel: object
    types: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int = 1
    unit: Sequence[str] = ()
    aligned: Sequence[str] = field(default=())
    # names starting with one of these are aligned too (resolved at compile time: under the interpreter a kernel
    # has no parameter list)
    aligned_prefixes: Sequence[str] = ()

    def specialised(self) -> Tuple[Dict[str, str], Dict[str, object], Dict[tuple, list]]:
        """(signature, constexprs, attrs) as ``triton.compiler.ASTSource`` takes them."""
        constexprs = dict(self.constexprs)
        signature = {}
        for param in self.kernel.params:
            if param.is_constexpr or param.name in self.unit:
                signature[param.name] = "constexpr"
            else:
                signature[param.name] = self.types.get(param.name, "i32")
        for name in self.unit:
            constexprs[name] = 1
        missing = [p.name for p in self.kernel.params if p.is_constexpr and p.name not in constexprs
                   and not p.has_default]
        if missing:
            raise ValueError(f"{self.name}: constexprs: no value for {', '.join(missing)}")
        for p in self.kernel.params:
            if p.is_constexpr and p.name not in constexprs:
                constexprs[p.name] = p.default
        names = list(signature)
        unknown = [n for n in list(self.types) + list(self.aligned) if n not in names]
        if unknown:
            raise ValueError(f"{self.name}: {', '.join(unknown)} are not parameters of the kernel")
        aligned = list(self.aligned) + [n for n in names if n not in self.aligned
                                        and any(n.startswith(p) for p in self.aligned_prefixes)]
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        return signature, constexprs, attrs


def pointers(case_types: Dict[str, str]) -> Tuple[str, ...]:
    """The pointer arguments among ``case_types`` (allocations are 16-byte aligned)."""
    return tuple(n for n, t in case_types.items() if t.startswith("*"))
