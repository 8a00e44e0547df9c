"""Networks (``torch.nn.Module``) and their loading from resolved model folders (:mod:`regcli.weights`)."""

from __future__ import annotations

from importlib import import_module
from typing import Any, Optional

#: ``config.json`` "architecture" -> the function that builds regcli's network of that architecture from a
#: resolved model (the one registration and training use)
BUILDERS = {
    "regcli-sam-embedding": "regcli.models.embedding:embedding_from",
    "regcli-dio-features": "regcli.models.dio:dio_from",
    "gradicon-multistep": "regcli.models.gradicon:gradicon_from",
    "promptreg": "regcli.models.promptreg:promptreg_from",
}


def network_from(model, device=None) -> Optional[Any]:
    """The network of a resolved, verified :class:`regcli.weights.ResolvedModel`, built as loading it for
    registration would (eval mode), so with the same one-line WeightsError when it does not load (no
    ``architecture`` or ``net`` in its ``config.json``, a ``net`` that is not that network's configuration,
    tensors that do not fit); None for an architecture that is not one of regcli's networks (:data:`BUILDERS`)."""
    from regcli.weights import require_config_key

    require_config_key(model, "architecture")
    architecture = model.config["architecture"]
    target = BUILDERS.get(architecture) if isinstance(architecture, str) else None
    if target is None:
        return None
    module, name = target.split(":")
    return getattr(import_module(module), name)(model, device)
