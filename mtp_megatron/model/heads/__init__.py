"""The MTP heads: the shared part and the design interface (base.py), the sequential backward (sequential.py), one
module per design, and what the heads read (inputs.py). ``build_heads`` makes the design ``mtp.head_type`` names."""

from mtp_megatron.model.heads.base import MTPHeads
from mtp_megatron.model.heads.chained import AnticausalHeads, CausalHeads
from mtp_megatron.model.heads.cp import CPHeads
from mtp_megatron.model.heads.inputs import STAT_CORRECT, STAT_LOSS_SUM, STAT_TOKENS, HeadInputs
from mtp_megatron.model.heads.linear import LinearHeads
from mtp_megatron.model.heads.transformer import TransformerHeads

DESIGNS = {design.head_type: design
           for design in (TransformerHeads, LinearHeads, CausalHeads, AnticausalHeads, CPHeads)}
"""``mtp.head_type`` -> its design."""

__all__ = ["DESIGNS", "HeadInputs", "MTPHeads", "STAT_CORRECT", "STAT_LOSS_SUM", "STAT_TOKENS", "build_heads",
           "extra_stat_names"]


def build_heads(head_type: str, *args, cp_rank: int = 1, cp_balance_coef: float = 0.0, **kwargs) -> MTPHeads:
    """The heads of design ``head_type`` (MTPHeads' arguments; the CP rank and balance coefficient for ``cp``)."""
    if head_type == "cp":
        return CPHeads(*args, cp_rank=cp_rank, cp_balance_coef=cp_balance_coef, **kwargs)
    return DESIGNS[head_type](*args, **kwargs)


def extra_stat_names(head_type: str, cp_rank: int = 1) -> tuple[str, ...]:
    """Names of a design's statistics rows after the heads' (without building it)."""
    if head_type == "cp":
        return ("cp/joint", "cp/balance", *(f"cp/weight_{a + 1}" for a in range(cp_rank)))
    return ()
