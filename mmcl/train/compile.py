"""torch.compile of the towers, in place.

`nn.Module.compile()` keeps the module object and its parameters (only its call goes through the
compiled graph), so parameter names, optimiser groups, checkpoints and conversion see the same model
as in eager mode; `torch.compile(module)` would wrap it and prefix every key with `_orig_mod.`.
"""

from __future__ import annotations

from mmcl.models import MultiEncoder


def compile_towers(model: MultiEncoder) -> None:
    """Compile each tower; the logit scale and the loss stay eager (one scalar, and a loss whose shape
    varies with the pairs a batch holds)."""
    for modality in model.modalities:
        model.tower(modality).compile()
