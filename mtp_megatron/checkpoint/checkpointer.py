"""Save and restore the whole training state as megatron-core distributed checkpoints (torch_dist format).

What a checkpoint holds, and where:

* sharded (each rank writes its part; reshardable to any TP x PP x DP on load): ``model`` (trunk and every MTP
  head: the heads shard themselves, see model/heads/base.py), written by every engine alike so that checkpoints
  reshard, load across engines and tools read them alike; ``optimizer`` where the engine's optimizer is
  megatron-core's (its ``fully_reshardable`` form); ``rng_state`` (checkpoint/state.py);
* the engine's own files in a subfolder (engines/base.py ``private_folder``): DeepSpeed's ZeRO partitions in
  ``deepspeed/``, FSDP2's optimizer state in ``fsdp/``, loadable at the layout they were saved with;
* common (rank 0 writes it once): the train state, the LR schedule and the ``mtp_megatron`` metadata, checked
  before anything is loaded (checkpoint/state.py).

A checkpoint and the model loading it may differ in their ``_extra_state`` objects alone, which are skipped:
Transformer Engine's layers keep their FP8 scaling metadata there (its norms too, where local norms have none),
megatron-core's local linears an empty one, and neither needs the other's; their weights have the same keys
(model/specs.py). Any other key that the checkpoint holds and no rank asks for, or that a rank asks for and the
checkpoint lacks, is an error naming it: no weight is dropped silently.

Which checkpoint a run starts from: checkpoint/resume_plan.py. Folder handling (temporary name, commit,
``latest``, checksums, pruning): checkpoint/store.py.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy, get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper, FullyParallelSaveStrategyWrapper,
)
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException

from mtp_megatron.checkpoint import store
from mtp_megatron.checkpoint.helper_processes import bind_helper_processes_to_this_rank
from mtp_megatron.checkpoint.resume_plan import start_plan
from mtp_megatron.checkpoint.state import (
    DATA_FIELDS, LEGACY_SHARDING_METADATA, META_KEY, SHARDING_METADATA, TRAIN_STATE_KEY, key_mismatches, layout,
    optimizer_setup, read_meta, rng_state, set_rng_state, shape_mismatches, tokenizer_identity,
)
from mtp_megatron.checkpoint.store import CheckpointError
from mtp_megatron.config import Config, config_to_dict
from mtp_megatron.distributed.parallel import ParallelEnv
from mtp_megatron.engines import Engine, EngineStateError, ModelOnly
from mtp_megatron.training.state import TrainState


def _all_finite(tensors: Iterable[torch.Tensor], device) -> bool:
    """Collective: whether every tensor given (this rank's parameters) is finite on every rank."""
    bad = torch.zeros(1, device=device)
    for tensor in tensors:
        if not torch.isfinite(tensor).all():
            bad.fill_(1)
            break
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bad.item()


class Checkpointer:
    """Saves this run's checkpoints and restores the state a run starts from. Collective: every call on every rank."""

    def __init__(self, cfg: Config, env: ParallelEnv, engine: Engine):
        """``engine``: the run's (engines.build_engine), or ``ModelOnly`` around a bare model for weights only."""
        self.cfg, self.env, self.engine = cfg, env, engine
        self.root = os.path.join(cfg.run.dir, "checkpoints")
        self._async_queue = AsyncCallsQueue() if cfg.checkpoint.async_save else None
        self._pending: Optional[str] = None  # the async save not yet committed
        self.last_committed: Optional[str] = None  # the newest complete checkpoint this run wrote or started from

    # -- saving -----------------------------------------------------------------------------------------------

    def _sharded_state(self, is_loading: bool, with_optimizer: bool, with_rng: bool,
                       metadata: Optional[dict] = None) -> dict:
        """The engine's model (and optimizer) part plus this rank's RNG states, in the form ``metadata`` asks for
        (a load asks for the form its checkpoint was written in; default: ``SHARDING_METADATA``)."""
        state = self.engine.sharded_state(metadata or SHARDING_METADATA, is_loading=is_loading,
                                          with_optimizer=with_optimizer)
        if with_rng:
            state["rng_state"] = rng_state(self.env)
        return state

    def _layout(self) -> dict:
        return layout(self.env, self.cfg.parallel.layers_per_stage)

    def _meta(self) -> dict:
        cfg = self.cfg
        return {
            "format": store.FORMAT,
            "config": config_to_dict(cfg),
            "padded_vocab_size": cfg.model.padded_vocab_size(cfg.parallel.tp),
            "layout": self._layout(),
            "engine": self.engine.name,
            "sharding_metadata": SHARDING_METADATA,
            "optimizer": optimizer_setup(cfg) if self.engine.optimizer is not None else None,
            "tokenizer": tokenizer_identity(cfg),
        }

    def save(self, state: TrainState, path: Optional[str] = None) -> str:
        """Save at ``state.step`` into ``path`` (default: the run's ``iter_NNNNNNN``); returns that folder. With
        ``async_save`` it is committed at a later step boundary (``finalize``)."""
        # megatron-core's writer helpers must not outlive a killed rank. Bound at the first save, not before: a
        # process that only reads (generate, convert, a user's script) starts no helper process.
        bind_helper_processes_to_this_rank()
        self.finalize(blocking=True)  # at most one save in flight
        self.engine.sync_parameters()  # overlap_param_gather: the other DP shards' weights are this step's only now
        start = time.perf_counter()
        in_run = path is None
        final = os.path.join(self.root, store.step_dir_name(state.step)) if in_run else os.path.normpath(path)
        tmp = store.temporary_path(final)
        if not _all_finite(self.engine.local_parameters(), self.env.device):
            raise CheckpointError(f"step {state.step}: the model has non-finite weights; refusing to save them "
                                  "over good checkpoints. Restart from the newest checkpoint "
                                  "(checkpoint.resume=auto).")
        if self.env.rank == 0:
            if os.path.exists(tmp):  # left by a save that died
                store._remove(tmp)
            os.makedirs(tmp)
        dist.barrier()
        sharded = self._sharded_state(is_loading=False, with_optimizer=self.engine.optimizer is not None,
                                      with_rng=True)
        sharded[TRAIN_STATE_KEY] = state.state_dict()
        sharded[META_KEY] = self._meta()
        if self.engine.scheduler is not None:
            sharded["scheduler"] = self.engine.scheduler.state_dict()
        # Every DP replica writes a slice of the replicated tensors instead of DP rank 0 writing them all.
        strategy = FullyParallelSaveStrategyWrapper(
            get_default_save_sharded_strategy(), parallel_state.get_data_parallel_group(with_context_parallel=True)
        )
        with self._reporting_write_errors(tmp, state.step):
            request = dist_checkpointing.save(sharded, tmp, strategy,
                                              async_sharded_save=self._async_queue is not None)
        with self._reporting_write_errors(tmp, state.step):
            if self.engine.optimizer is not None:
                self.engine.save_private(tmp)  # DeepSpeed's and FSDP2's optimizer state
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
            if store.disk_full(error, tmp):
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
                store.write_manifest(tmp, step, {"layout": self._layout(), "engine": self.engine.name}, checksums)
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
        # Every rank's writes first: an engine's own files (FSDP2's optimizer state) are written by each DP group on
        # its own, and a group's metadata can land after rank 0's group is done.
        dist.barrier()
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
        plan = [start_plan(self.cfg.checkpoint, self.root) if self.env.rank == 0 else None]
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
        if meta["optimizer"] != optimizer_setup(cfg):
            differences = ", ".join(f"{k}: checkpoint {meta['optimizer'][k]!r}, this run {v!r}"
                                    for k, v in optimizer_setup(cfg).items() if meta["optimizer"].get(k) != v)
            raise CheckpointError(
                f"checkpoint {path} holds optimizer state for another optimizer setup ({differences}); it cannot be "
                "loaded into this one. Fix: use the checkpoint's settings to resume, or checkpoint.finetune=true to "
                "take its weights with a fresh optimizer.")
        if not self.engine.optimizer_reshards and meta["layout"] != self._layout():
            raise CheckpointError(
                f"checkpoint {path} holds {self.engine.name} optimizer state for layout {meta['layout']}, and this "
                f"run is {self._layout()}: it loads only at the layout it was saved with. Fix: resume at that "
                "layout, or checkpoint.finetune=true to take its (reshardable) weights with a fresh optimizer.")

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
        same_layout = meta["layout"] == self._layout()
        with_optimizer = not weights_only and self.engine.optimizer is not None
        sharded = self._sharded_state(is_loading=True, with_optimizer=with_optimizer,
                                      with_rng=with_optimizer and same_layout,
                                      metadata=meta.get("sharding_metadata", LEGACY_SHARDING_METADATA))
        try:
            # RETURN_ALL: megatron reports both kinds of mismatch (and leaves requested keys that are absent
            # out of the load) instead of ignoring keys that no rank asks for; key_mismatches judges them.
            loaded, in_checkpoint_only, requested_only = dist_checkpointing.load(
                sharded, path, self._load_strategy(path), strict=StrictHandling.RETURN_ALL)
        except Exception as error:  # megatron-core and torch raise many kinds; keep the cause chained
            raise CheckpointError(f"reading checkpoint {path} failed: {type(error).__name__}: {error}") from error
        mismatches = key_mismatches(in_checkpoint_only, requested_only, "optimizer" in sharded,
                                    "rng_state" in sharded)
        if not mismatches:
            mismatches = self.engine.load_model_state(loaded["model"])
        if mismatches:
            raise CheckpointError(f"checkpoint {path} does not hold this model's weights:\n  - "
                                  + "\n  - ".join(mismatches) + "\nFix: load it with the model settings it "
                                  "was saved with (its config.yaml), or convert it (tools/convert_checkpoint.py).")
        if not with_optimizer:
            self.engine.after_weights_loaded()
            self._announce(f"initialised the model from {path} (weights only)")
            return TrainState()

        try:
            self.engine.load_optimizer(loaded, path)
        except EngineStateError as error:
            raise CheckpointError(str(error)) from error
        self._restore_schedule(loaded["scheduler"])
        self._report_data_changes(meta["config"])
        if same_layout:
            set_rng_state(loaded["rng_state"])
        state = TrainState.from_state_dict(loaded[TRAIN_STATE_KEY])
        resharded = "" if same_layout else f" (saved at {meta['layout']}, resharded; RNG states not restored)"
        self._announce(f"resumed from {path} at step {state.step}, {state.consumed_samples} samples{resharded}")
        return state

    def _load_strategy(self, path: str):
        """megatron-core's default reader for ``path``, the reads split among DP replicas unless
        ``checkpoint.fully_parallel_load=false``."""
        strategy = get_default_load_sharded_strategy(path)
        if not self.cfg.checkpoint.fully_parallel_load or self.env.dims.dp == 1:
            return strategy
        return FullyParallelLoadStrategyWrapper(
            strategy, parallel_state.get_data_parallel_group(with_context_parallel=True))

    def _restore_schedule(self, saved: dict) -> None:
        """Continue the LR schedule at the saved position. Its shape comes from this run's config, so a resumed
        run may change it (say, more iterations); changes are reported."""
        current = self.engine.scheduler.state_dict()
        changed = [f"{k}: {saved[k]} -> {current[k]}" for k in current if k != "num_steps" and saved.get(k) != current[k]]
        if changed:
            self._announce("LR schedule differs from the checkpoint's (this run's config wins): " + ", ".join(changed))
        scheduler = self.engine.scheduler
        scheduler.step(increment=saved["num_steps"] - scheduler.num_steps)

    def _report_data_changes(self, saved_config: dict) -> None:
        """Say when the data a resumed run reads is not the checkpoint run's: the run continues at the saved sample
        count, but in another sample sequence."""
        now = config_to_dict(self.cfg)
        changed = [f"{section}.{name}: {saved_config.get(section, {}).get(name)!r} -> {now[section][name]!r}"
                   for section, names in DATA_FIELDS.items() for name in names
                   if saved_config.get(section, {}).get(name, now[section][name]) != now[section][name]]
        if changed:
            self._announce("the data differs from the checkpoint's (" + "; ".join(changed) + "): the run continues "
                           "at the checkpoint's sample count in this run's data, not where the checkpoint's "
                           "data left off")

    def newest_before(self, step: int) -> Optional[str]:
        """The newest committed checkpoint of this run saved before ``step`` (a rollback target), or None."""
        before = [path for path in store.committed(self.root) if (store.step_of(path) or 0) < step]
        return before[-1] if before else None

    def _announce(self, message: str) -> None:
        if self.env.rank == 0:
            print(f"[checkpoint] {message}", flush=True)


def save_weights(module, env: ParallelEnv, cfg: Config, path: str) -> None:
    """Collective: a weights-only checkpoint of the bare ``module`` at ``path`` (a seed checkpoint; load with
    ``checkpoint.finetune``)."""
    Checkpointer(cfg, env, ModelOnly(cfg, env, module)).save(TrainState(), path)
