"""Checkpoint save and load: synchronous vs asynchronous save, time training is blocked, time to commit, size.

    python bench/checkpoint_io.py                  # tiny + ~100M model, 1 and 2 processes (about 3 min on 2 cores)
    python bench/checkpoint_io.py --quick          # tiny config only (smoke check, about 40 s)
    python bench/checkpoint_io.py --world-sizes 1 --repeats 3

Models: ``configs/tiny.yaml`` as it is, and a ~100M-parameter model on the same recipe (tiny.yaml with d 768, 12
attention heads, ffn 2048, vocab 32000, seq 128, ``model.num_layers=4`` and ``mtp.n_heads=4``, i.e. a 3-layer
trunk plus 4 head layers, each with its own unembedding; the count is printed). Each world size runs in fresh
processes spawned by ``mtp_megatron.testing.distributed.run_distributed`` (gloo, torchrun's environment
variables; DP = world size, distributed optimizer, so DP=2 exercises the optimizer-state gather and megatron's
fully parallel save, each DP rank writing half of the tensors). Every rank gets ``cpu_count / world size`` torch
threads.

Per model: build it as training does (``bench/_common.build_trainer``), take one real ``train_step`` so the Adam
state exists, then for ``--repeats`` rounds save once with ``checkpoint.async_save=false`` and once with ``true``
(the order alternates between rounds), each followed by a load of what was written:

* sync: the time ``Checkpointer.save`` takes is both the time training is blocked and the time until the
  checkpoint is committed (renamed from ``iter_N.tmp``, ``latest`` updated);
* async: blocked = until ``save()`` returns (state dict built, tensors staged, writer process forked);
  committed = until ``finalize(blocking=True)``, called right after ``save()`` returns, has committed it (so the
  writer runs with nothing beside it);
* load: ``Checkpointer.load`` into the same model and optimizer after their weights and Adam moments were
  perturbed; the restored state must equal, bit for bit, a fingerprint taken just before the save (the run fails
  otherwise). Files are read back from the page cache (written seconds before), not from a cold disk;
* size: the bytes of the committed ``iter_N`` folder;
* checksums: the part of the sync save spent computing the manifest's CRC-32s (every rank reading back its share
  of the files), and the part of the load spent verifying them.

Then one more async save runs with a training step beside it: the step's time is compared with a step with no save
in flight, and the checkpoint, committed at the next boundary, must hold the state at the save, not the step's
update. Times are per rank around a barrier; the tables show the slowest rank and the median over rounds. The first
save in a process also starts megatron-core's result-queue manager (a spawned process, a few seconds, once): the
tiny model takes one untimed sync and async save first, and that first-save time is printed. Peak RSS is the main
process's high-water mark above its resident set before the save (rank 0; writer processes not counted).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import MiB, REPO_ROOT, build_trainer, machine_line, median, release, table  # noqa: E402
from bench.head_memory import _proc_status_kib, _reset_hwm  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from mtp_megatron.checkpoint.checkpointer import Checkpointer  # noqa: E402
from mtp_megatron.config import load_config  # noqa: E402
from mtp_megatron.testing.distributed import run_distributed  # noqa: E402
from mtp_megatron.training.state import TrainState  # noqa: E402

TINY = "tiny"
M100 = "~100M"
_100M_OVERRIDES = [
    "model.hidden_size=768", "model.num_attention_heads=12", "model.ffn_hidden_size=2048", "model.num_layers=4",
    "mtp.n_heads=4", "model.vocab_size=32000", "model.seq_length=128", "train.micro_batch_size=1",
]


def make_config(model: str, world_size: int, run_dir: str, async_save: bool):
    overrides = [f"run.dir={run_dir}", f"checkpoint.async_save={str(async_save).lower()}", "checkpoint.keep=null",
                 "logging.tensorboard=false", "train.device=cpu"]
    if model == M100:
        # one microbatch per rank per step
        overrides += _100M_OVERRIDES + [f"train.global_batch_size={world_size}", "train.iters=1000"]
    return load_config(os.path.join(REPO_ROOT, "configs", "tiny.yaml"), overrides)


# -- on every rank ------------------------------------------------------------------------------------------------


def _optimizer_states(optimizer):
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", part)
        for state in inner.state.values():
            for key in sorted(state):
                if isinstance(state[key], torch.Tensor):
                    yield state[key]


def _fingerprint(trainer) -> torch.Tensor:
    """Per-tensor float64 sums of the weights and of this rank's optimizer state (exact under a bit-exact restore)."""
    tensors = list(trainer.model.parameters()) + list(_optimizer_states(trainer.optimizer))
    return torch.stack([t.detach().double().sum() for t in tensors])


def _perturb(trainer) -> None:
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
        for t in _optimizer_states(trainer.optimizer):
            if t.is_floating_point() and t.dim() > 0:
                t.mul_(0.5).add_(1.0)


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(parent, name)) for parent, _, names in os.walk(path) for name in names)


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())  # the checkpointer's "[checkpoint] saved ..." lines


def _timed(fn, sink: dict, key: str):
    """``fn``, adding its run time to ``sink[key]``."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink[key] = sink.get(key, 0.0) + time.perf_counter() - start
    return wrapper


class _Bench:
    def __init__(self, model: str, world_size: int, root: str):
        run_dir = os.path.join(root, f"{model.strip('~')}_ws{world_size}")
        self.cfgs = {mode: make_config(model, world_size, run_dir, mode == "async") for mode in ("sync", "async")}
        self.trainer = build_trainer(self.cfgs["sync"], max_steps=8)
        t = self.trainer
        self.rank = t.env.rank
        self.savers = {mode: Checkpointer(cfg, t.env, t.engine)
                       for mode, cfg in self.cfgs.items()}
        self.saves = 0
        self.parts: dict = {}  # time inside the save spent building the sharded state dict (optimizer gather)
        for saver in self.savers.values():
            saver._sharded_state = _timed(saver._sharded_state, self.parts, "state_dict")
            saver._checksums = _timed(saver._checksums, self.parts, "checksums")  # the manifest's CRC-32s
            saver.verify = _timed(saver.verify, self.parts, "verify")  # checking them before a load

    def step(self) -> float:
        dist.barrier()
        start = time.perf_counter()
        self.trainer.train_step()
        return time.perf_counter() - start

    def save(self, mode: str, beside=None) -> dict:
        """One save; ``beside`` (a callable) runs after ``save()`` returns and before the commit is awaited."""
        saver = self.savers[mode]
        self.saves += 1
        state = TrainState(step=self.saves, consumed_samples=self.saves * self.cfgs[mode].train.global_batch_size)
        expected = _fingerprint(self.trainer)
        rss_before = _proc_status_kib("VmRSS")
        hwm_ok = _reset_hwm()
        dist.barrier()
        self.parts.clear()
        start = time.perf_counter()
        with _quiet():
            path = saver.save(state)
        blocked = time.perf_counter() - start
        result = {"blocked": blocked, "state_dict": self.parts.get("state_dict", 0.0)}
        if mode == "sync":  # an async save computes them at its commit, below
            result["checksums"] = self.parts.get("checksums", 0.0)
        if beside is not None:
            result["beside"] = beside()
        with _quiet():
            saver.finalize(blocking=True)
        result["commit"] = time.perf_counter() - start
        hwm = _proc_status_kib("VmHWM")
        result["rss_peak"] = (hwm - rss_before) * 1024 if hwm_ok and hwm and rss_before else None
        result["bytes"] = _folder_bytes(path) if self.rank == 0 else None
        result.update(self._load(path, expected))
        return result

    def _load(self, path: str, expected: torch.Tensor) -> dict:
        _perturb(self.trainer)
        dist.barrier()
        self.parts.pop("verify", None)
        start = time.perf_counter()
        with _quiet():
            state = self.savers["sync"].load(path)
        seconds = time.perf_counter() - start
        verify = self.parts.get("verify", 0.0)
        restored = bool(torch.equal(_fingerprint(self.trainer), expected)) and state.step == self.saves
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(path)
        dist.barrier()
        return {"load": seconds, "verify": verify, "restored": restored}

    def close(self) -> None:
        with _quiet():
            for saver in self.savers.values():
                saver.close()
        release(self.trainer)


def measure_worker(models: list, world_size: int, repeats: int, root: str) -> dict:
    """Runs on every rank (spawned by ``run_distributed``); returns this rank's timings per model."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    out = {}
    for model in models:
        bench = _Bench(model, world_size, root)
        t = bench.trainer
        rec = {"params": sum(p.numel() for p in t.model.parameters()), "threads": torch.get_num_threads(),
               "rounds": [], "first_save": None}
        bench.step()  # Adam state exists from here on
        if model == TINY:  # warm-up: the first save of the process starts megatron's result-queue manager
            rec["first_save"] = bench.save("sync")["blocked"]
            bench.save("async")
        for r in range(repeats):
            order = ("sync", "async") if r % 2 == 0 else ("async", "sync")
            rec["rounds"].append({mode: bench.save(mode) for mode in order})
        rec["step_alone"] = bench.step()
        rec["overlap"] = bench.save("async", beside=bench.step)
        bench.close()
        out[model] = rec
    return out


# -- the optimizer's checkpoint form: save memory and load reads -------------------------------------------------

FORMS = {"per-rank ranges (ours)": "SHARDING_METADATA", "fully_reshardable (gather)": "LEGACY_SHARDING_METADATA"}


def _read_bytes() -> int:
    """Bytes this process has read through read() so far (``rchar``: page-cache hits included)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def forms_worker(model: str, world_size: int, root: str) -> dict:
    """On every rank: a sync save in each optimizer form (its peak RSS above the RSS before it), then loads of
    one of them with and without the fully parallel read (time and bytes read by this rank)."""
    import dataclasses

    from mtp_megatron.checkpoint import checkpointer as checkpointer_module
    from mtp_megatron.checkpoint import state as checkpoint_state

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    cfg = make_config(model, world_size, os.path.join(root, f"forms_ws{world_size}"), False)
    trainer = build_trainer(cfg, max_steps=4)
    trainer.train_step()
    state_bytes = trainer.engine.state_bytes()
    out = {"state": state_bytes, "saves": {}, "loads": {}}
    saver = Checkpointer(cfg, trainer.env, trainer.engine)
    with _quiet():  # untimed: the first save starts megatron-core's helper processes
        saver.save(TrainState(step=1), os.path.join(root, "warmup"))
    paths = {}
    for step, (form, name) in enumerate(FORMS.items(), start=2):
        checkpointer_module.SHARDING_METADATA = getattr(checkpoint_state, name)
        try:
            rss_before, hwm_ok = _proc_status_kib("VmRSS"), _reset_hwm()
            dist.barrier()
            start = time.perf_counter()
            with _quiet():
                paths[form] = saver.save(TrainState(step=step))
            seconds = time.perf_counter() - start
            hwm = _proc_status_kib("VmHWM")
        finally:
            checkpointer_module.SHARDING_METADATA = checkpoint_state.SHARDING_METADATA
        out["saves"][form] = {"seconds": seconds, "rss_peak": (hwm - rss_before) * 1024 if hwm_ok else None,
                              "bytes": _folder_bytes(paths[form]) if trainer.env.rank == 0 else None}
    ours = paths[next(iter(FORMS))]
    for parallel in (True, False):
        loader = Checkpointer(dataclasses.replace(cfg, checkpoint=dataclasses.replace(
            cfg.checkpoint, fully_parallel_load=parallel)), trainer.env, trainer.engine)
        dist.barrier()
        read, start = _read_bytes(), time.perf_counter()
        with _quiet():
            loader.load(ours, verified=True)  # the checksum pass (its own 1/world of the files) left out
        out["loads"][parallel] = {"seconds": time.perf_counter() - start, "read": _read_bytes() - read}
    with _quiet():
        saver.close()
    release(trainer)
    return out


def _print_forms(model: str, results: dict) -> None:
    print(f"## optimizer checkpoint form ({model}, distributed optimizer, DP = ranks): extra peak RSS of a sync save "
          "against the rank's own share of the state; loads of our form, with and without the fully parallel read")
    rows = []
    for ws, ranks in results.items():
        size = ranks[0]["saves"][next(iter(FORMS))]["bytes"]
        share = size / ws  # what each rank writes with the fully parallel save
        for form in FORMS:
            peak = max(r["saves"][form]["rss_peak"] or 0 for r in ranks)
            rows.append([ws, form, f"{ranks[0]['saves'][form]['bytes'] / MiB:.1f}", f"{share / MiB:.1f}",
                         f"{peak / MiB:.0f}", f"**{peak / share:.2f}x**",
                         f"{max(r['saves'][form]['seconds'] for r in ranks):.2f}"])
    print(table(["ranks", "optimizer form", "checkpoint MiB", "own share MiB (size / ranks)",
                 "save peak RSS +MiB (worst rank)", "peak / own share", "save s (slowest rank)"], rows))
    print()
    rows = []
    for ws, ranks in results.items():
        size = ranks[0]["saves"][next(iter(FORMS))]["bytes"]
        for parallel in (True, False):
            reads = [r["loads"][parallel]["read"] for r in ranks]
            rows.append([ws, "fully parallel" if parallel else "each rank alone",
                         f"{max(r['loads'][parallel]['seconds'] for r in ranks):.2f}",
                         f"{max(reads) / MiB:.0f}", f"{sum(reads) / MiB:.0f}", f"{sum(reads) / size:.2f}x"])
    print(table(["ranks", "load", "load s (slowest rank)", "MiB read, most by one rank", "MiB read, all ranks",
                 "all reads / checkpoint size"], rows))
    print()


# -- the parent: spawn, collect, print ----------------------------------------------------------------------------


def _slowest(ranks: list, *keys):
    """The maximum over ranks of rank[key1][key2]...; None when any rank has none."""
    values = []
    for r in ranks:
        for k in keys:
            r = r[k]
        values.append(r)
    return None if any(v is None for v in values) else max(values)


def _summarise(ranks: list, model: str) -> dict:
    """Per model and world size: medians over rounds of the slowest rank."""
    rounds = len(ranks[0][model]["rounds"])

    def med(mode, key):
        return median([_slowest([r[model] for r in ranks], "rounds", i, mode, key) for i in range(rounds)])

    r0 = ranks[0][model]
    s = {"params": r0["params"], "threads": r0["threads"], "rounds": rounds, "first_save": r0["first_save"]}
    for mode in ("sync", "async"):
        for key in ("blocked", "commit", "load", "state_dict", "verify"):
            s[f"{mode}_{key}"] = med(mode, key)
        s[f"{mode}_rss"] = median([r0["rounds"][i][mode]["rss_peak"] or 0 for i in range(rounds)])
    s["sync_checksums"] = med("sync", "checksums")
    s["bytes"] = r0["rounds"][0]["sync"]["bytes"]
    sizes = [r0["rounds"][i][m]["bytes"] for i in range(rounds) for m in ("sync", "async")]
    s["size_spread"] = max(sizes) - min(sizes)
    s["restored"] = all(rr[model]["rounds"][i][m]["restored"] for rr in ranks for i in range(rounds)
                        for m in ("sync", "async")) and all(rr[model]["overlap"]["restored"] for rr in ranks)
    s["step_alone"] = _slowest([r[model] for r in ranks], "step_alone")
    s["step_beside"] = _slowest([r[model] for r in ranks], "overlap", "beside")
    s["overlap_blocked"] = _slowest([r[model] for r in ranks], "overlap", "blocked")
    s["overlap_commit"] = _slowest([r[model] for r in ranks], "overlap", "commit")
    return s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the tiny config (smoke check)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2],
                        help="process counts (DP), each run in fresh processes (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds of (sync save + load, async save + load) per model; medians reported "
                             "(default %(default)s)")
    parser.add_argument("--form-world-sizes", type=int, nargs="*", default=[1, 2, 4],
                        help="process counts for the optimizer-form table (~100M model; tiny with --quick; "
                             "none to skip; default %(default)s)")
    parser.add_argument("--dir", default=os.path.join(REPO_ROOT, "runs", "bench_checkpoint_io"),
                        help="where the checkpoints are written (deleted afterwards; default %(default)s)")
    args = parser.parse_args(argv)

    models = [TINY] if args.quick else [TINY, M100]
    if os.path.exists(args.dir):
        shutil.rmtree(args.dir)
    machine = machine_line(torch.device("cpu"))  # before the run: its load average is the machine's, not ours
    wall = time.perf_counter()
    results = {}
    try:
        for ws in args.world_sizes:
            ranks = run_distributed(measure_worker, ws, models, ws, args.repeats, args.dir)
            for model in models:
                results[(model, ws)] = _summarise(ranks, model)
        form_model = TINY if args.quick else M100
        forms = {ws: run_distributed(forms_worker, ws, form_model, ws, args.dir) for ws in args.form_world_sizes}
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    wall = time.perf_counter() - wall

    print(f"# checkpoint_io: save / load of the full training state (model, Adam state, schedule, RNG), "
          f"medians of {args.repeats} rounds, slowest rank")
    print(f"machine: {machine}")
    print("checkpoint folder: " + os.path.relpath(args.dir, REPO_ROOT) + f" (filesystem of {REPO_ROOT})")
    for model in models:
        s = results[(model, args.world_sizes[0])]
        cfg = make_config(model, 1, "unused", False)
        m = cfg.model
        print(f"{model}: {s['params']:,} parameters (d {m.hidden_size}, {m.num_attention_heads} attention heads, ffn "
              f"{m.resolved_ffn_hidden_size()}, vocab {m.vocab_size}, seq {m.seq_length}, trunk "
              f"{cfg.trunk_num_layers()} layers + {cfg.mtp.n_heads} heads, {cfg.train.precision}, "
              f"{cfg.parallel.sharding})")
    print()

    rows = []
    for (model, ws), s in results.items():
        rows.append([model, ws, f"{s['bytes'] / MiB:.1f}", f"{s['bytes'] / s['params']:.1f}",
                     f"{s['sync_blocked']:.2f}", f"{s['async_blocked']:.2f}",
                     f"**{s['async_blocked'] / s['sync_blocked']:.2f}x**", f"{s['async_commit']:.2f}",
                     f"{s['async_commit'] / s['sync_commit']:.2f}x", f"{s['sync_load']:.2f}",
                     f"{s['async_load']:.2f}", f"{s['bytes'] / MiB / s['sync_commit']:.0f}"])
    print(table(["model", "ranks", "size MiB", "bytes/param", "sync save s (blocked = committed)",
                 "async blocked s", "async/sync blocked", "async committed s", "async/sync committed",
                 "load s (sync ckpt)", "load s (async ckpt)", "MiB / sync save s"], rows))
    print()
    rows = []
    for (model, ws), s in results.items():
        rows.append([model, ws, s["threads"], f"{s['sync_state_dict']:.2f}",
                     f"{s['sync_checksums']:.3f} ({s['sync_checksums'] / s['sync_commit']:.0%})",
                     f"{s['sync_verify']:.3f} ({s['sync_verify'] / s['sync_load']:.0%})", f"{s['sync_rss'] / MiB:.0f}",
                     f"{s['async_rss'] / MiB:.0f}", f"{s['step_alone'] * 1e3:.0f}", f"{s['step_beside'] * 1e3:.0f}",
                     f"{s['step_beside'] / s['step_alone']:.2f}x", f"{s['overlap_commit']:.2f}"])
    print(table(["model", "ranks", "threads/rank", "of sync save: state dict s", "of sync save: checksums s",
                 "of load: verifying checksums s", "peak RSS +MiB sync",
                 "peak RSS +MiB async", "step ms, no save", "step ms beside async write", "step ratio",
                 "async save + step: committed s"], rows))
    print()
    if forms:
        _print_forms(form_model, forms)
    firsts = ", ".join(f"{ws} rank{'s' if ws > 1 else ''}: {results[(TINY, ws)]['first_save']:.2f} s"
                       for ws in args.world_sizes)
    print(f"first save in a process (tiny, sync; includes starting megatron's result-queue manager): {firsts}")
    ok = all(s["restored"] for s in results.values())
    spread = max(s["size_spread"] for s in results.values())
    same = all(s["size_spread"] <= 1e-3 * s["bytes"] for s in results.values())
    print(f"every load restored the saved weights and Adam state bit for bit (also the async save with a step "
          f"beside it): {'yes' if ok else 'NO'}")
    print(f"a model's sync and async folders differ in size by at most {spread} bytes (the pickled RNG and train "
          f"states vary by a few bytes){'' if same else ': MORE THAN 0.1%'}")
    print(f"run time {wall:.0f} s; load average (1 min) at the end %.2f" % os.getloadavg()[0])
    return 0 if ok and same else 2


if __name__ == "__main__":
    sys.exit(main())
