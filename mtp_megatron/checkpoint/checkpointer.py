"""Save and restore the whole training state as megatron-core distributed checkpoints (torch_dist format).

What a checkpoint holds, and where:

* sharded (each rank writes its part; reshardable to any TP x PP x DP on load): ``model`` (trunk and every MTP
  head: the heads shard themselves, see model/heads.py), ``optimizer`` (megatron-core's optimizer state; the
  distributed optimizer in its ``fully_sharded_model_space`` form, parallel to write and reshardable in every
  dimension), ``rng_state`` (one object per rank, restored only at the same layout);
* common (rank 0 writes it once): ``train_state`` (step, consumed samples), ``scheduler`` and ``mtp_megatron``:
  the resolved config, the layout, the optimizer setup and the tokenizer's identity, checked before anything is
  loaded so that a wrong checkpoint fails with the fields that differ rather than deep inside a collective.

Under DeepSpeed ZeRO (``parallel.sharding=zero1|2|3``) the model and the common part are written the same way
(so they reshard, and tools read them alike; ZeRO-3 gathers each TP shard for it), and DeepSpeed's engine writes
its optimizer partitions beside them in ``deepspeed/``, loadable at the layout they were saved with.

A checkpoint and the model loading it may differ in their ``_extra_state`` objects alone, which are skipped:
Transformer Engine's layers keep their FP8 scaling metadata there (its norms too, where local norms have none),
megatron-core's local linears an empty one, and neither needs the other's; their weights have the same keys
(model/specs.py). Any other key that the checkpoint holds and no rank asks for, or that a rank asks for and the
checkpoint lacks, is an error naming it: no weight is dropped silently.

Folder handling (temporary name, commit, ``latest``, pruning) is in checkpoint/store.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import random
import time
import warnings
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException

from mtp_megatron.checkpoint import store
from mtp_megatron.checkpoint.helper_processes import bind_helper_processes_to_this_rank
from mtp_megatron.checkpoint.store import CheckpointError
from mtp_megatron.config import Config, config_to_dict
from mtp_megatron.data.tokenizer import tokenizer_identity as data_tokenizer_identity
from mtp_megatron.distributed.parallel import ParallelEnv
from mtp_megatron.model.builder import sync_parameters
from mtp_megatron.training.deepspeed_engine import is_deepspeed_engine
from mtp_megatron.training.state import TrainState

META_KEY = "mtp_megatron"
DEEPSPEED_TAG = "deepspeed"  # the subfolder DeepSpeed's engine writes its optimizer state into
TRAIN_STATE_KEY = "train_state"
# Megatron-LM's metadata for the optimizer's sharded state: a per-parameter layout that every rank writes in
# parallel and that loads at any TP x PP x DP; no prefix from ChainedOptimizer, so keys do not depend on grouping.
_SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}

# Model fields that fix the tensors' shapes: a checkpoint loads only into a model that agrees on all of them.
_SHAPE_FIELDS = {
    "model": ["num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "head_dim", "ffn_hidden_size",
              "normalization", "activation", "position_embedding", "add_bias_linear"],
    "mtp": ["n_heads", "match_params"],
}


# What decides which samples a run reads, in which order: a resumed run that changes one reads other data.
_DATA_FIELDS = {
    "data": ["paths", "synthetic", "split", "reset_attention_mask", "reset_position_ids", "eod_mask_loss"],
    "model": ["seq_length"],
    "train": ["seed", "global_batch_size"],
}


def tokenizer_identity(cfg: Config) -> dict:
    """The identity of the run's tokenizer (type, model hash: data/tokenizer.py)."""
    return data_tokenizer_identity(cfg.tokenizer.type, cfg.tokenizer.model)


def _layout(env: ParallelEnv) -> dict:
    return {"tp": env.dims.tp, "pp": env.dims.pp, "dp": env.dims.dp}


def _optimizer_setup(cfg: Config) -> dict:
    """What the optimizer state's structure depends on (loading it into another setup is not possible)."""
    return {"sharding": cfg.parallel.sharding, "precision": cfg.train.precision}


def _rng_state(env: ParallelEnv) -> ShardedObject:
    """This rank's random generators, as one object per (pp, tp, dp) position."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),  # megatron's TP-region streams (dropout)
    }
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    dims = env.dims
    return ShardedObject("rng_state", state, (dims.pp, dims.tp, dims.dp), (env.pp_rank, env.tp_rank, env.dp_rank),
                         replica_id=0)


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _prime_adam_state(optimizer) -> None:
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
def _keep_adam_step_on_load(optimizer):
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


def _disk_full(error: BaseException, folder: str) -> bool:
    """Whether ``error`` (or what caused it) is a full disk: ENOSPC, or torch's zip writer failing (its message
    hides the errno: "unexpected pos") while the file system has (almost) no space left."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    parent = folder
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:
        return shutil.disk_usage(parent or ".").free < 16 * 2**20
    except OSError:
        return False


def _all_finite(model, device) -> bool:
    """Collective: whether every parameter on every rank is finite."""
    bad = torch.zeros(1, device=device)
    for param in model.parameters():
        if not torch.isfinite(param).all():
            bad.fill_(1)
            break
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bad.item()


def _is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state")


def key_mismatches(in_checkpoint_only: set, requested_only: set, optimizer_requested: bool,
                   rng_requested: bool) -> list[str]:
    """What a load must not skip: the sharded keys the checkpoint holds and no rank requested (the parts of the
    checkpoint this load does not ask for aside: optimizer state, RNG states), and those requested but absent;
    ``_extra_state`` objects are not counted (see the module docstring)."""
    def not_asked_for(key: str) -> bool:
        return ((key.startswith("optimizer.") and not optimizer_requested)
                or (key == "rng_state" and not rng_requested))

    found = [f"{key}: in the checkpoint, and nothing in this run loads it" for key in sorted(in_checkpoint_only)
             if not _is_extra_state(key) and not not_asked_for(key)]
    found += [f"{key}: this model's, and not in the checkpoint" for key in sorted(requested_only)
              if not _is_extra_state(key)]
    return found


def read_meta(path: str) -> dict:
    """The ``mtp_megatron`` metadata and train state of a checkpoint (any rank, no collective)."""
    common = dist_checkpointing.load_common_state_dict(path)
    if META_KEY not in common:
        raise CheckpointError(f"{path} is a distributed checkpoint without mtp-megatron metadata. Fix: convert it "
                              "with tools/convert_checkpoint.py, or point checkpoint.load at one this trainer wrote.")
    return {**common[META_KEY], TRAIN_STATE_KEY: common.get(TRAIN_STATE_KEY)}


def shape_mismatches(saved_config: dict, saved_padded_vocab: int, cfg: Config) -> list[str]:
    """The model-shape fields on which a checkpoint's config and ``cfg`` disagree, as 'field: saved X, now Y'."""
    now = config_to_dict(cfg)
    found = [f"{section}.{name}: checkpoint {saved_config[section][name]!r}, this run {now[section][name]!r}"
             for section, names in _SHAPE_FIELDS.items() for name in names
             if saved_config[section].get(name) != now[section][name]]
    padded = cfg.model.padded_vocab_size(cfg.parallel.tp)
    if saved_padded_vocab != padded:
        found.append(f"vocabulary rows (model.vocab_size padded to make_vocab_size_divisible_by * tp): checkpoint "
                     f"{saved_padded_vocab}, this run {padded}")
    return found


class Checkpointer:
    """Saves this run's checkpoints and restores the state a run starts from. Collective: every call on every rank."""

    def __init__(self, cfg: Config, env: ParallelEnv, model, optimizer=None, scheduler=None):
        self.cfg, self.env = cfg, env
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.deepspeed = is_deepspeed_engine(model)
        self.module = model.module if self.deepspeed else unwrap_model(model)  # the bare MTPGPTModel
        self.root = os.path.join(cfg.run.dir, "checkpoints")
        bind_helper_processes_to_this_rank()  # megatron-core's writer helpers must not outlive a killed rank
        self._async_queue = AsyncCallsQueue() if cfg.checkpoint.async_save else None
        self._pending: Optional[str] = None  # the async save not yet committed
        self.last_committed: Optional[str] = None  # the newest complete checkpoint this run wrote or started from

    # -- saving -----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _full_parameters(self, modified: bool = False):
        """ZeRO-3 keeps 1/dp of each parameter on a rank: gather them for reading (or, with ``modified``, writing,
        broadcast from DP rank 0 and re-partitioned on exit). Nothing to do otherwise."""
        if not (self.deepspeed and self.model.zero_optimization_stage() == 3):
            yield
            return
        import deepspeed

        source = dist.get_global_rank(self.env.groups.dp, 0) if modified else None
        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=source):
            yield

    def _sharded_state_dict(self, is_loading: bool, with_optimizer: bool, with_rng: bool) -> dict:
        model_sd = self.module.sharded_state_dict(metadata=dict(_SHARDING_METADATA))
        state = {"model": model_sd}
        if with_optimizer and not self.deepspeed:  # DeepSpeed's engine writes its own optimizer state
            if is_loading:
                _prime_adam_state(self.optimizer)
            state["optimizer"] = self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                                   metadata=dict(_SHARDING_METADATA))
        if with_rng:
            state["rng_state"] = _rng_state(self.env)
        return state

    def _meta(self) -> dict:
        cfg = self.cfg
        return {
            "format": store.FORMAT,
            "config": config_to_dict(cfg),
            "padded_vocab_size": cfg.model.padded_vocab_size(cfg.parallel.tp),
            "layout": _layout(self.env),
            "optimizer": _optimizer_setup(cfg) if self.optimizer is not None else None,
            "tokenizer": tokenizer_identity(cfg),
        }

    def save(self, state: TrainState, path: Optional[str] = None) -> str:
        """Save at ``state.step`` into ``path`` (default: the run's ``iter_NNNNNNN``); returns that folder. With
        ``async_save`` it is committed at a later step boundary (``finalize``)."""
        self.finalize(blocking=True)  # at most one save in flight
        sync_parameters(self.model)  # overlap_param_gather: the other DP shards' weights are this step's only now
        start = time.perf_counter()
        in_run = path is None
        final = os.path.join(self.root, store.step_dir_name(state.step)) if in_run else os.path.normpath(path)
        tmp = store.temporary_path(final)
        # One gather of ZeRO-3's partitioned parameters serves the finiteness check and the save.
        with self._full_parameters():
            if not _all_finite(self.module, self.env.device):
                raise CheckpointError(f"step {state.step}: the model has non-finite weights; refusing to save them "
                                      "over good checkpoints. Restart from the newest checkpoint "
                                      "(checkpoint.resume=auto).")
            if self.env.rank == 0:
                if os.path.exists(tmp):  # left by a save that died
                    store._remove(tmp)
                os.makedirs(tmp)
            dist.barrier()
            sharded = self._sharded_state_dict(is_loading=False, with_optimizer=self.optimizer is not None,
                                               with_rng=True)
            sharded[TRAIN_STATE_KEY] = state.state_dict()
            sharded[META_KEY] = self._meta()
            if self.scheduler is not None:
                sharded["scheduler"] = self.scheduler.state_dict()
            # Every DP replica writes a slice of the replicated tensors instead of DP rank 0 writing them all.
            strategy = FullyParallelSaveStrategyWrapper(
                get_default_save_sharded_strategy(), parallel_state.get_data_parallel_group(with_context_parallel=True)
            )
            with self._reporting_write_errors(tmp, state.step):
                request = dist_checkpointing.save(sharded, tmp, strategy,
                                                  async_sharded_save=self._async_queue is not None)
        with self._reporting_write_errors(tmp, state.step):
            if self.deepspeed and self.optimizer is not None:
                self.model.save_checkpoint(tmp, tag=DEEPSPEED_TAG, save_latest=False)
        commit = self._commit_fn(tmp, final, state.step, start, in_run)
        if request is None:
            with self._reporting_write_errors(tmp, state.step):
                commit()
        else:
            request.add_finalize_fn(commit)
            self._async_queue.schedule_async_request(request)
            self._pending = final
            self._announce(f"{final}: training resumes after {time.perf_counter() - start:.2f} s; writing in the "
                           "background")
        return final

    @contextlib.contextmanager
    def _reporting_write_errors(self, tmp: str, step: int):
        """A failed write (a full disk above all) becomes one SaveError that says where, why and what is safe."""
        try:
            yield
        except CheckpointError:
            raise
        # torch, megatron-core and DeepSpeed raise many kinds (torch.distributed.checkpoint's CheckpointException
        # is a BaseException); keep the cause chained.
        except (Exception, TorchCheckpointException) as error:
            if _disk_full(error, tmp):
                what = f"no space left on device at {os.path.dirname(tmp)}"
            else:
                what = f"writing {tmp} failed ({type(error).__name__}: {str(error).strip()[:300]})"
            newest = self.last_committed or store.read_latest(self.root)
            if self.env.rank == 0:
                store._remove(tmp)  # this save's own partial files: never a checkpoint, and they fill the disk
            raise store.SaveError(
                f"step {step}: {what}; this checkpoint was not saved (its partial files were removed). The last "
                f"complete checkpoint is {newest or 'none: nothing was saved yet'}. Fix: free space (or set "
                "checkpoint.keep), then rerun the same command to resume from it.") from error

    def _commit_fn(self, tmp: str, final: str, step: int, start: float, in_run: bool):
        def commit():
            checksums = self._checksums(tmp)  # collective: every rank reads back its share of the files
            if self.env.rank == 0:
                store.write_manifest(tmp, step, {"layout": _layout(self.env),
                                                 "engine": "deepspeed" if self.deepspeed else "megatron"},
                                     checksums)
                moved = store.commit(tmp, final, update_latest=in_run)
                if moved:
                    self._announce(f"an earlier {os.path.basename(final)} (another line of this run) was moved to "
                                   f"{moved}")
                for folder in store.prune(self.root, self.cfg.checkpoint.keep) if in_run else []:
                    self._announce(f"deleted {folder} (checkpoint.keep={self.cfg.checkpoint.keep})")
                self._announce(f"saved {final} in {time.perf_counter() - start:.2f} s")
            dist.barrier()
            self._pending, self.last_committed = None, final
        return commit

    def _checksums(self, folder: str) -> dict:
        """Collective: the CRC-32 of every file of ``folder``, each rank reading every world_size-th file."""
        names = store.list_files(folder) if self.env.rank == 0 else None
        shared = [names]
        dist.broadcast_object_list(shared, src=0)
        mine = {name: store.file_crc32(os.path.join(folder, name))
                for name in store.share(shared[0], self.env.rank, self.env.dims.world_size)}
        gathered = [None] * self.env.dims.world_size
        dist.all_gather_object(gathered, mine)
        return {name: crc for part in gathered for name, crc in part.items()}

    def verify(self, folder: str) -> list[str]:
        """Collective: what is missing or damaged in checkpoint ``folder`` (sizes and checksums, each rank
        reading every world_size-th file), the same list on every rank; empty when it is intact."""
        names = store.manifest_names(folder)
        mine = store.problems(folder, store.share(names, self.env.rank, self.env.dims.world_size), checksums=True)
        if not names:  # no readable manifest: every rank finds the same reason
            mine = store.problems(folder) if self.env.rank == 0 else []
        gathered = [None] * self.env.dims.world_size
        dist.all_gather_object(gathered, mine)
        return [problem for part in gathered for problem in part]

    def finalize(self, blocking: bool = False) -> None:
        """Commit a finished background save (all ranks must call this at the same points)."""
        if self._async_queue is not None and self._pending is not None:
            self._async_queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        self.finalize(blocking=True)
        if self._async_queue is not None:
            self._async_queue.close()

    # -- restoring --------------------------------------------------------------------------------------------

    def source(self) -> tuple[Optional[str], bool]:
        """(checkpoint to start from or None, whether to take its weights only), agreed on by all ranks.

        The run's own checkpoints come first: ``latest``, then older ones, each verified (sizes and checksums), a
        damaged one skipped with a warning naming the file. ``checkpoint.load`` naming one of them rolls the run
        back to it; naming another folder starts a run whose folder has no checkpoints yet. A folder that holds
        checkpoints of which none is usable is refused, naming each and why.
        """
        plan = [self._plan() if self.env.rank == 0 else None]
        dist.broadcast_object_list(plan, src=0)
        plan = plan[0]
        if isinstance(plan, CheckpointError):
            raise plan
        for note in plan["notes"]:
            self._announce(note)
        rejected = []
        for candidate in plan["candidates"]:
            found = self.verify(candidate)
            if not found:
                break
            rejected.append((candidate, found))
            if plan["explicit"]:
                raise CheckpointError(store.damaged_message(candidate, found))
            if self.env.rank == 0:
                warnings.warn(f"skipping checkpoint {candidate}: {'; '.join(found)}; trying the one before it")
        else:
            if rejected:
                listing = "\n".join(f"  - {path}: {'; '.join(found)}" for path, found in rejected)
                raise CheckpointError(
                    f"{self.root} holds checkpoints, and none of them can be loaded:\n{listing}\nNothing was "
                    "changed. Fix: repair them or move them out of checkpoints/, point checkpoint.load at a good "
                    "checkpoint elsewhere, or start over in a new run.dir.")
            return None, False
        if plan["abandoned"] is not None and self.env.rank == 0:
            moved = store.roll_back(self.root, candidate, plan["abandoned"])
            self._announce(f"rolled back to {candidate}" + (f"; the later checkpoints {', '.join(moved)} are kept "
                                                            "there, out of the way" if moved else ""))
        dist.barrier()
        return candidate, plan["weights_only"]

    def _plan(self):
        """Rank 0: which checkpoints to try, in order (see ``source``), or the CheckpointError to raise."""
        ckpt, root = self.cfg.checkpoint, self.root
        for stale in store.stale_temporaries(root):  # our own saves that died (one live run per folder)
            warnings.warn(f"ignoring {stale}: a save that did not finish; deleting it")
            store._remove(stale)
        own = store.committed(root)
        plan = {"candidates": [], "weights_only": False, "explicit": False, "abandoned": None, "notes": []}
        if ckpt.resume == "never" and own:
            return CheckpointError(f"{root} already holds checkpoints and checkpoint.resume=never. Fix: use a new "
                                   "run.dir, or checkpoint.resume=auto to continue that run.")
        load = os.path.realpath(ckpt.load) if ckpt.load else None
        line, abandoned = store.resume_line(root)
        if load is not None and os.path.dirname(load) == os.path.realpath(root):
            target = os.path.join(root, os.path.basename(load))
            if ckpt.finetune:
                return CheckpointError(f"checkpoint.load={ckpt.load} is a checkpoint of this run.dir, and "
                                       "checkpoint.finetune=true would start a new run in the same folder. Fix: "
                                       "use a new run.dir for the fine-tuned run.")
            done = store.rollback_done(root, target)
            latest = store.read_latest(root)
            if done and latest and (store.step_of(latest) or 0) > (store.step_of(target) or 0):
                plan["notes"].append(f"checkpoint.load={ckpt.load}: this rollback was done at {done['time']}; "
                                     f"continuing the run from {latest} (drop checkpoint.load from the command to "
                                     "silence this)")
                plan["candidates"] = line
                return plan
            plan.update(candidates=[target], explicit=True,
                        abandoned=[f for f in own if (store.step_of(f) or 0) > (store.step_of(target) or 0)])
            plan["notes"].append(f"checkpoint.load={ckpt.load} names a checkpoint of this run: rolling the run "
                                 "back to it")
            return plan
        if own:
            plan["candidates"] = line
            if abandoned:
                plan["abandoned"] = abandoned
                plan["notes"].append(f"{os.path.join(root, store.LATEST)} names {line[0]}, older than "
                                     f"{', '.join(abandoned)}: rolling the run back to it")
            if load is not None:
                plan["notes"].append(f"checkpoint.load={ckpt.load} is not used: {root} has checkpoints of its own, "
                                     "which the run continues from (checkpoint.load starts a run whose folder has "
                                     "none; for a new run from it, use a new run.dir)")
            return plan
        if load is not None:
            plan.update(candidates=[load], weights_only=ckpt.finetune, explicit=True)
        return plan

    def restore(self) -> TrainState:
        """Load the state this run starts from (see ``source``); a fresh TrainState when there is none."""
        path, weights_only = self.source()
        if path is None:
            return TrainState()
        return self.load(path, weights_only=weights_only, verified=True)

    def _check(self, path: str, meta: dict, weights_only: bool) -> None:
        cfg = self.cfg
        mismatches = shape_mismatches(meta["config"], meta["padded_vocab_size"], cfg)
        if mismatches:
            raise CheckpointError(f"checkpoint {path} is for a different model:\n  - " + "\n  - ".join(mismatches)
                                  + "\nFix: set these fields as the checkpoint has them, or load another checkpoint.")
        if weights_only:
            if meta["tokenizer"] != tokenizer_identity(cfg):
                warnings.warn(f"{path} was trained with tokenizer {meta['tokenizer']}, this run uses "
                              f"{tokenizer_identity(cfg)}: the embeddings will not mean the same tokens")
            return
        if meta["tokenizer"] != tokenizer_identity(cfg):
            raise CheckpointError(
                f"checkpoint {path} was trained with tokenizer {meta['tokenizer']}, this run uses "
                f"{tokenizer_identity(cfg)}. Fix: use the checkpoint's tokenizer (see its config in the run folder), "
                "or checkpoint.finetune=true to start a new run from its weights.")
        if meta["optimizer"] is None:
            raise CheckpointError(f"checkpoint {path} holds model weights only (no optimizer state to resume). "
                                  "Fix: checkpoint.finetune=true to start from its weights.")
        if meta["optimizer"] != _optimizer_setup(cfg):
            differences = ", ".join(f"{k}: checkpoint {meta['optimizer'][k]!r}, this run {v!r}"
                                    for k, v in _optimizer_setup(cfg).items() if meta["optimizer"].get(k) != v)
            raise CheckpointError(
                f"checkpoint {path} holds optimizer state for another optimizer setup ({differences}); it cannot be "
                "loaded into this one. Fix: use the checkpoint's settings to resume, or checkpoint.finetune=true to "
                "take its weights with a fresh optimizer.")
        if self.deepspeed and meta["layout"] != _layout(self.env):
            raise CheckpointError(
                f"checkpoint {path} holds DeepSpeed ZeRO optimizer partitions for layout {meta['layout']}, and this "
                f"run is {_layout(self.env)}: DeepSpeed loads them only at the layout they were saved with. Fix: "
                "resume at that layout, or checkpoint.finetune=true to take its (reshardable) weights with a fresh "
                "optimizer.")

    def load(self, path: str, weights_only: bool = False, verified: bool = False) -> TrainState:
        """Collective: fill the model (and unless ``weights_only``, optimizer, schedule, RNG) from ``path``, after
        checking its files against the manifest unless the caller has (``verified``)."""
        path = os.path.normpath(path)
        self.last_committed = path
        if not dist_checkpointing.check_is_distributed_checkpoint(path):
            raise CheckpointError(f"{path} is not a distributed checkpoint (no metadata.json). Fix: point "
                                  "checkpoint.load at a folder this trainer wrote (<run.dir>/checkpoints/iter_NNNNNNN).")
        found = [] if verified else self.verify(path)
        if found:
            raise CheckpointError(store.damaged_message(path, found))
        meta = read_meta(path)
        self._check(path, meta, weights_only)
        same_layout = meta["layout"] == _layout(self.env)
        with_optimizer = not weights_only and self.optimizer is not None
        with self._full_parameters(modified=True):
            sharded = self._sharded_state_dict(is_loading=True, with_optimizer=with_optimizer,
                                               with_rng=with_optimizer and same_layout)
            try:
                # RETURN_ALL: megatron reports both kinds of mismatch (and leaves requested keys that are absent
                # out of the load) instead of ignoring keys that no rank asks for; key_mismatches judges them.
                loaded, in_checkpoint_only, requested_only = dist_checkpointing.load(
                    sharded, path, strict=StrictHandling.RETURN_ALL)
            except Exception as error:  # megatron-core and torch raise many kinds; keep the cause chained
                raise CheckpointError(f"reading checkpoint {path} failed: {type(error).__name__}: {error}") from error
            mismatches = key_mismatches(in_checkpoint_only, requested_only, "optimizer" in sharded,
                                        "rng_state" in sharded)
            if not mismatches:
                # strict=False: a requested _extra_state that the checkpoint lacks keeps the module's own.
                result = self.module.load_state_dict(loaded["model"], strict=False)
                mismatches = [f"{key}: not loaded into this model" for key in [*result.missing_keys,
                                                                                *result.unexpected_keys]
                              if not _is_extra_state(key)]
            if mismatches:
                raise CheckpointError(f"checkpoint {path} does not hold this model's weights:\n  - "
                                      + "\n  - ".join(mismatches) + "\nFix: load it with the model settings it "
                                      "was saved with (its config.yaml), or convert it (tools/convert_checkpoint.py).")
        if not with_optimizer:
            if self.deepspeed and self.optimizer is not None:
                self.optimizer.refresh_fp32_params()  # ZeRO's fp32 master partitions from the loaded weights
            elif self.optimizer is not None:
                self.optimizer.reload_model_params()  # mixed precision: refresh the fp32 main copy
            self._announce(f"initialised the model from {path} (weights only)")
            return TrainState()

        if self.deepspeed:
            self._load_deepspeed_optimizer(path)
        else:
            with _keep_adam_step_on_load(self.optimizer):
                self.optimizer.load_state_dict(loaded["optimizer"])
        self._restore_schedule(loaded["scheduler"])
        self._report_data_changes(meta["config"])
        if same_layout:
            _set_rng_state(loaded["rng_state"])
        state = TrainState.from_state_dict(loaded[TRAIN_STATE_KEY])
        resharded = "" if same_layout else f" (saved at {meta['layout']}, resharded; RNG states not restored)"
        self._announce(f"resumed from {path} at step {state.step}, {state.consumed_samples} samples{resharded}")
        return state

    def _load_deepspeed_optimizer(self, path: str) -> None:
        folder = os.path.join(path, DEEPSPEED_TAG)
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder} is missing: checkpoint {path} has no DeepSpeed optimizer state. Fix: "
                                  "checkpoint.finetune=true to start from its weights.")
        loaded, _ = self.model.load_checkpoint(path, tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=False, load_module_strict=True)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not read its optimizer state from {folder}. Fix: "
                                  "checkpoint.finetune=true to start from the checkpoint's weights.")

    def _restore_schedule(self, saved: dict) -> None:
        """Continue the LR schedule at the saved position. Its shape comes from this run's config, so a resumed
        run may change it (say, more iterations); changes are reported."""
        current = self.scheduler.state_dict()
        changed = [f"{k}: {saved[k]} -> {current[k]}" for k in current if k != "num_steps" and saved.get(k) != current[k]]
        if changed:
            self._announce("LR schedule differs from the checkpoint's (this run's config wins): " + ", ".join(changed))
        self.scheduler.step(increment=saved["num_steps"] - self.scheduler.num_steps)

    def _report_data_changes(self, saved_config: dict) -> None:
        """Say when the data a resumed run reads is not the checkpoint run's: the run continues at the saved sample
        count, but in another sample sequence."""
        now = config_to_dict(self.cfg)
        changed = [f"{section}.{name}: {saved_config.get(section, {}).get(name)!r} -> {now[section][name]!r}"
                   for section, names in _DATA_FIELDS.items() for name in names
                   if saved_config.get(section, {}).get(name, now[section][name]) != now[section][name]]
        if changed:
            self._announce("the data differs from the checkpoint's (" + "; ".join(changed) + "): the run continues "
                           "at the checkpoint's sample count in this run's data, not where the checkpoint's "
                           "data left off")

    def _announce(self, message: str) -> None:
        if self.env.rank == 0:
            print(f"[checkpoint] {message}", flush=True)


def save_weights(model, env: ParallelEnv, cfg: Config, path: str) -> None:
    """Collective: a weights-only checkpoint at ``path`` (a seed checkpoint; load with ``checkpoint.finetune``)."""
    Checkpointer(cfg, env, model).save(TrainState(), path)
