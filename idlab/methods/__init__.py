"""Fine-tuning methods, one module each, behind one interface (`base.Method`) and one registry.

Adding a method: a module with its settings, axes and `Method` subclass, one `register` line
below, and its tests (docs/ARCHITECTURE.md, "Add a method"). ``lora_peft`` is the thin layer
over PEFT that the LoRA method uses (also public: `idlab.apply_lora`, ...).
"""

from idlab.methods.base import Axes, CellScores, GridContext, Method, PlanTerms, Prepared, Style
from idlab.methods.full import FullFineTuning
from idlab.methods.lora import LoRA
from idlab.methods.peft_family import PeftMethod
from idlab.methods.registry import (
    axes_from_config,
    baseline_method,
    get,
    names,
    register,
    unregister,
    variant,
)
from idlab.methods.subspace import Subspace

register(FullFineTuning())
register(LoRA())
register(Subspace())
register(PeftMethod())

__all__ = ["Axes", "CellScores", "GridContext", "Method", "PlanTerms", "Prepared", "Style", "axes_from_config", "baseline_method",
           "get", "names", "register", "unregister", "variant"]
