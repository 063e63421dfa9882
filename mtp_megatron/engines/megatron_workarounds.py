"""Workarounds for megatron-core 0.16.1 in loading its (distributed) optimizer's state into torch's Adam, used by
``MegatronEngine`` (engines/megatron.py). Apex's and Transformer Engine's fused Adam, the usual GPU choice, keep
``step`` elsewhere and need none of this; each function says which bug it works around."""

from __future__ import annotations

import contextlib

import torch


def prime_adam_state(optimizer) -> None:
    """Give each parameter of a fresh torch Adam the state its first update would create (step 0, zero moments).

    megatron-core's DistributedOptimizer.state_dict(), which building the state dict to load into calls, reads every
    parameter's Adam ``step``; torch's Adam creates it only at the first update (Apex's and TE's fused Adam, the
    usual GPU choice, keep ``step`` elsewhere and need nothing). The loaded checkpoint then overwrites it all.
    """
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                              exp_avg_sq=torch.zeros_like(param))


@contextlib.contextmanager
def keep_adam_step_on_load(optimizer):
    """Work around two megatron-core 0.16.1 bugs in loading the distributed optimizer's state into torch's Adam
    (Apex's and TE's fused Adam, without a per-parameter ``step``, never reach this code):

    * ``load_state_dict`` sets each parameter's ``step``, then copies the loaded tensors over every state key,
      ``step`` included, which the loaded tensors deliberately lack (KeyError). Copying the step onto itself
      keeps the value just set.
    * it gives every parameter the same ``step`` tensor, which torch's Adam then increments in place once per
      parameter, so the bias correction is wrong from the next update on. Each parameter gets its own copy.
    """
    patched = []
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(part, "_set_main_param_and_optimizer_states"):
            continue  # not a DistributedOptimizer

        def set_states(model_param, tensors, _part=part, _original=part._set_main_param_and_optimizer_states):
            group_index, group_order = _part.model_param_group_index_map[model_param]
            state = _part.optimizer.state[_part.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"]}
            return _original(model_param, tensors)

        part._set_main_param_and_optimizer_states = set_states
        patched.append(part)
    try:
        yield
    finally:
        for part in patched:
            del part._set_main_param_and_optimizer_states  # back to the class's method
            for state in part.optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].clone()
