"""The whole GPU path in one command: each step a fresh process, timed and guarded, one JSON + Markdown report.

    bash bench/gpu_check.sh                          # on a GPU machine: CUDA, bf16, the sizes below (~6 min, H200)
    bash bench/gpu_check.sh --device cpu --quick     # the same steps at tiny sizes on CPU (CI: under 2 minutes)

Steps (each one runs whatever happened to the ones before; a failed step is reported and the next runs):

1. install: megatron-core and DeepSpeed from the wheel folder (``--wheels``, default ``.whl/``: a cp312 megatron-core
   wheel, the DeepSpeed sdist and the pure-Python packages they need), into a scratch ``--target`` folder put
   first on PYTHONPATH; skipped when both already import.
2. environment: python, torch, CUDA, the device, megatron-core, DeepSpeed, transformers versions.
3. data: this repository's own Python sources as a byte-level Megatron dataset (tools/preprocess_data.py).
4. smoke: configs/tiny.yaml trained on it for 30 steps (quick: 10) in bf16 (CPU: fp32) through
   ``python -m mtp_megatron.train``; every head's loss must fall (mean of the last 3 steps below the first 3).
5. resume: the same run stopped at half way (``train.stop_at_step``) and restarted: every logged step's losses and
   the final weights must equal the uninterrupted run's bit for bit.
6. head_gradients: sequential vs naive head backward, per-parameter gradients in fp32 and bf16
   (bench/head_gradients.py, which states and justifies the tolerances).
7. head_memory: peak memory of n=1, n=4 naive, n=4 sequential and megatron-core's own GPTModel n=1 at vocabulary 32k
   and 128k, sequence 4096 (bench/head_memory.py). Goal: sequential within 1.05x of n=1.
8. step_time: a 1.3B-parameter shape (d 2048, 24 layers, seq 4096), n=4 vs n=1, heads on top (with a fused-kernels-off
   variant) and parameter-matched (bench/step_time.py): time ratio, tokens/s, MFU. Goal: matched n=4/n=1 <= 1.10.
9. generate (fp32): ``python -m mtp_megatron.generate --compare`` greedy vs speculative on the smoke run's checkpoint
   (identical tokens, tokens per forward, speedup), and bench/decode_speed.py at batch 1 and 8.
10. deepspeed: a ZeRO-2 run of the tiny config (DP=1): the engine starts and steps on this device.
11. fsdp: the same with torch FSDP2 (``parallel.sharding=fsdp``, DP=1), bf16 on GPU.

The report goes to ``--out`` (default ``$OUT`` when set, else ``runs/gpu_check``): report.json, report.md and
gpu_check.log (every step's command and output). Exit 0 when every step passed, 1 otherwise. Goals (memory and
time ratios) are reported, not enforced: they are measurements, not tests.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Whether megatron-core and DeepSpeed are installed, without the ~10 s of importing them.
FIND_PACKAGES = ("import importlib.util as u, sys; "
                 "sys.exit(0 if u.find_spec('megatron.core') and u.find_spec('deepspeed') else 1)")


@dataclass
class Sizes:
    """What each step runs at: full on a GPU, tiny with ``--quick``."""

    smoke_steps: int
    gradients: list
    memory: list  # one argument list per head_memory run
    step_time: list  # one argument list per step_time run
    new_tokens: int
    timeout: int  # seconds per step


FULL = Sizes(
    smoke_steps=30,
    gradients=["--vocab", "32000", "--seq", "2048", "--hidden", "1024", "--attn-heads", "8", "--trunk-layers", "2"],
    memory=[["--vocab", str(v), "--seq", "4096", "--hidden", "2048", "--attn-heads", "16", "--trunk-layers", "4"]
            for v in (32000, 128256)],
    step_time=[
        ["--hidden", "2048", "--attn-heads", "16", "--trunk-layers", "23", "--seq", "4096", "--vocab", "32000",
         "--fusions-variant", "--one-at-a-time", "--warmup", "2", "--steps", "5"],
        ["--hidden", "2048", "--attn-heads", "16", "--trunk-layers", "23", "--seq", "4096", "--vocab", "32000",
         "--match-params", "--one-at-a-time", "--warmup", "2", "--steps", "5"],
    ],
    new_tokens=48,
    timeout=300,
)
QUICK = Sizes(
    smoke_steps=10,
    gradients=["--vocab", "2048", "--seq", "64", "--hidden", "64", "--trunk-layers", "2"],
    memory=[["--vocab", "4096", "--seq", "128", "--hidden", "64", "--trunk-layers", "2"]],
    step_time=[["--vocab", "2048", "--seq", "64", "--hidden", "64", "--trunk-layers", "4", "--match-params",
                "--fusions-variant", "--warmup", "1", "--steps", "2"]],
    new_tokens=16,
    timeout=120,
)


@dataclass
class Step:
    name: str
    status: str = "passed"  # passed | failed | skipped
    seconds: float = 0.0
    summary: str = ""
    figures: dict = field(default_factory=dict)
    commands: list = field(default_factory=list)
    log: list = field(default_factory=list, repr=False)


class StepFailed(Exception):
    pass


class Check:
    """Runs the steps in order, each in fresh processes, and writes the report."""

    def __init__(self, args):
        self.args = args
        self.sizes = QUICK if args.quick else FULL
        self.cuda = args.device == "cuda"
        self.precision = "bf16" if self.cuda else "fp32"
        self.work = args.work or tempfile.mkdtemp(prefix="gpu_check_")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # not a launcher's rank
            self.env.pop(key, None)
        os.makedirs(args.out, exist_ok=True)
        self.log = open(os.path.join(args.out, "gpu_check.log"), "w")
        self.steps: dict[str, Step] = {}
        self.lock = threading.Lock()
        self.finished = {name: threading.Event() for name, _, _ in self.plan()}

    # -- running -------------------------------------------------------------------------------------------------

    def run(self, step: Step, cmd: list, timeout: Optional[int] = None, check: bool = True,
            env: Optional[dict] = None):
        """Run ``cmd`` from the repository root; its output goes to the step's log. Returns (exit code, output)."""
        shown = " ".join(shlex.quote(c) for c in cmd)
        step.commands.append(shown)
        step.log.append(f"\n$ {shown}\n")
        try:
            done = subprocess.run(cmd, cwd=REPO, env=env or self.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout or self.sizes.timeout)
        except subprocess.TimeoutExpired as error:
            out = error.stdout or ""
            step.log.append(out if isinstance(out, str) else out.decode(errors="replace"))
            raise StepFailed(f"timed out after {timeout or self.sizes.timeout} s: {shown}") from None
        step.log.append(done.stdout + f"[exit {done.returncode}]\n")
        if check and done.returncode != 0:
            tail = " | ".join(line for line in done.stdout.strip().splitlines()[-3:])
            short = shown if len(shown) < 200 else shown[:200] + " ..."
            raise StepFailed(f"exit {done.returncode}: {short}: {tail[-400:]}")
        return done.returncode, done.stdout

    def step(self, name: str, body: Callable[[Step], None]) -> Step:
        step = Step(name)
        start = time.perf_counter()
        try:
            body(step)
        except StepFailed as error:
            step.status, step.summary = "failed", str(error)
        except Exception as error:  # a bug in a step's own checks must not hide the other steps
            step.status, step.summary = "failed", f"{type(error).__name__}: {error}"
        step.seconds = time.perf_counter() - start
        with self.lock:
            print(f"== {name}: {step.status} in {step.seconds:.1f} s: {step.summary}", flush=True)
            self.log.write(f"\n======== {name}: {step.status} in {step.seconds:.1f} s\n" + "".join(step.log))
            self.log.flush()
            self.steps[name] = step
        return step

    def python(self, *args) -> list:
        return [sys.executable, *args]

    def train_command(self, run_dir: str, *overrides: str, synthetic: bool = False) -> list:
        data = ([] if synthetic else  # tiny.yaml's default is megatron-core's mock dataset
                ["data.synthetic=false", f"data.paths=[{self.data}]", f"data.cache_dir={self.work}/data_cache"])
        return self.python(
            "-m", "mtp_megatron.train", "--config", "configs/tiny.yaml", f"run.dir={run_dir}",
            f"train.device={self.args.device}", f"train.precision={self.precision}", "logging.tensorboard=false",
            f"checkpoint.interval={self.sizes.smoke_steps}", *data, *overrides)

    @property
    def data(self) -> str:
        return os.path.join(self.work, "data", "code_text_document")

    # -- steps ---------------------------------------------------------------------------------------------------

    def install(self, step: Step) -> None:
        code, _ = self.run(step, self.python("-c", FIND_PACKAGES), check=False)
        if code == 0:
            step.status, step.summary = "skipped", "megatron-core and DeepSpeed already import"
            return
        wheels = self.args.wheels
        if not os.path.isdir(wheels) or not glob.glob(os.path.join(wheels, "*.whl")):
            raise StepFailed(f"megatron-core or DeepSpeed is missing and {wheels} holds no wheels. Fix: carry them "
                             "there (docs/benchmarks.md, 'GPU check') or install them")
        site = os.path.join(self.work, "site")
        pip = self.python("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                          "--target", site)
        self.run(step, pip + sorted(glob.glob(os.path.join(wheels, "*.whl"))))
        sdists = sorted(glob.glob(os.path.join(wheels, "deepspeed-*.tar.gz")))
        if sdists:  # DeepSpeed's ops compile on first use (JIT); the install builds none of them
            self.run(step, pip + ["--no-build-isolation"] + sdists, env=dict(self.env, DS_BUILD_OPS="0"))
        self.env["PYTHONPATH"] = os.pathsep.join([site, self.env["PYTHONPATH"]])
        self.run(step, self.python("-c", "import megatron.core, deepspeed"))  # their own dependencies are there
        step.summary = f"installed {len(os.listdir(wheels))} files from {wheels} into {site}"

    def environment(self, step: Step) -> None:
        probe = (  # versions from the installed metadata: importing DeepSpeed and transformers costs seconds
            "import json, platform, torch\n"
            "from importlib import metadata\n"
            "def version(name):\n"
            "    try:\n"
            "        return metadata.version(name)\n"
            "    except metadata.PackageNotFoundError:\n"
            "        return None\n"
            "cuda = torch.cuda.is_available()\n"
            "cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')),\n"
            "           platform.machine())\n"
            "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__,\n"
            "  'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name() if cuda else cpu,\n"
            "  'gpu_memory_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,\n"
            "  'megatron_core': version('megatron-core'), 'deepspeed': version('deepspeed'),\n"
            "  'transformers': version('transformers')}))\n"
        )
        _, out = self.run(step, self.python("-c", probe))
        step.figures = last_json(out)
        if self.cuda and not step.figures.get("cuda"):
            raise StepFailed("--device cuda but torch sees no GPU")
        step.summary = ", ".join(f"{k} {v}" for k, v in step.figures.items() if v is not None)

    def prepare_data(self, step: Step) -> None:
        self.run(step, self.python("tools/preprocess_data.py", "--input", "mtp_megatron", "--suffixes", ".py",
                             "--tokenizer-type", "ByteTokenizer", "--append-eod", "--workers", "1",
                             "--output-prefix", os.path.join(self.work, "data", "code")))
        size = os.path.getsize(self.data + ".bin")
        step.figures = {"bin_bytes": size}
        step.summary = f"{self.data}.bin/.idx, {size:,} bytes"

    def smoke(self, step: Step) -> None:
        steps = self.sizes.smoke_steps
        self.run(step, self.train_command(f"{self.work}/full", f"train.iters={steps}"))
        records = metrics(f"{self.work}/full")
        heads = sorted(k for k in records[0] if k.startswith("loss/head_"))
        first = {h: mean(r[h] for r in records[:3]) for h in heads}
        last = {h: mean(r[h] for r in records[-3:]) for h in heads}
        step.figures = {"steps": len(records), "first": first, "last": last}
        step.summary = "; ".join(f"{h[5:]} {first[h]:.3f} -> {last[h]:.3f}" for h in heads)
        if len(records) != steps:
            raise StepFailed(f"{len(records)} steps logged, expected {steps}")
        falling = [h for h in heads if last[h] < first[h]]
        if len(falling) != len(heads):
            raise StepFailed(f"loss did not fall for {sorted(set(heads) - set(falling))}: {step.summary}")

    def resume(self, step: Step) -> None:
        steps = self.sizes.smoke_steps
        half = steps // 2
        run_dir = f"{self.work}/stopped"
        self.run(step, self.train_command(run_dir, f"train.iters={steps}", f"train.stop_at_step={half}"))
        stopped_at = len(metrics(run_dir))
        self.run(step, self.train_command(run_dir, f"train.iters={steps}"))
        if not self.finished["smoke"].wait(timeout=self.sizes.timeout * 2):  # the uninterrupted run to compare with
            raise StepFailed("the smoke step (the uninterrupted run to compare with) did not finish")
        full, resumed = metrics(f"{self.work}/full"), metrics(run_dir)
        keys = [k for k in full[0] if k.startswith(("loss", "acc", "grad_norm", "lr"))]
        differ = [r["step"] for a, r in zip(full, resumed) if any(a.get(k) != r.get(k) for k in keys)]
        final = f"checkpoints/iter_{steps:07d}"
        _, out = self.run(step, self.python("bench/gpu_check.py", "--diff-checkpoints", f"{self.work}/full/{final}",
                                      f"{run_dir}/{final}"))
        weights = last_json(out)
        step.figures = {"stopped_at": stopped_at, "logged_steps": len(resumed), "steps_differ": differ,
                        "weights": weights}
        step.summary = (f"stopped after {stopped_at} steps, resumed to {len(resumed)}; logged steps that differ: "
                        f"{differ or 'none'}; final checkpoint (weights, optimizer, RNG and data states): "
                        f"{weights['entries']} entries, {len(weights['differ'])} differ")
        if stopped_at != half or len(resumed) != steps or differ or weights["differ"]:
            raise StepFailed(f"not bitwise equal to the uninterrupted run: {step.summary}")

    def head_gradients(self, step: Step) -> None:
        _, out = self.run(step, self.python("bench/head_gradients.py", "--device", self.args.device,
                                      *self.sizes.gradients), check=False)
        step.figures = last_json(out)
        step.summary = "; ".join(f"{dtype}: worst {r['worst_rel_error']:.1e} ({r['worst_parameter']}) <= "
                                 f"{r['tolerance']:.0e}" for dtype, r in step.figures.items())
        if not all(r["passed"] for r in step.figures.values()):
            raise StepFailed(f"outside tolerance: {step.summary}")

    def head_memory(self, step: Step) -> None:
        parts = []
        for shape in self.sizes.memory:
            # The goal is reported here, not enforced by the benchmark's exit code (--target).
            _, out = self.run(step, self.python("bench/head_memory.py", "--device", self.args.device, "--megatron-gpt",
                                          "--target", "1e9", "--gpt-target", "1e9", "--time-target", "1e9",
                                          "--time-steps", "3", *shape))
            r = last_json(out)
            step.figures[f"vocab_{r['vocab']}"] = r
            parts.append(f"V={r['vocab']}: n=4 seq/n=1 {r['sequential_over_n1']:.3f}x (goal <= 1.05: "
                         f"{'met' if r['sequential_over_n1'] <= 1.05 else 'missed'}), naive/n=1 "
                         f"{r['naive_over_n1']:.2f}x, seq/megatron GPTModel {r['sequential_over_megatron_gpt']:.3f}x")
            if not r["losses_agree"]:
                raise StepFailed(f"naive and sequential losses differ at vocab {r['vocab']}")
        step.summary = "; ".join(parts)

    def step_time(self, step: Step) -> None:
        parts = []
        for shape in self.sizes.step_time:
            _, out = self.run(step, self.python("bench/step_time.py", "--device", self.args.device, *shape),
                              timeout=self.sizes.timeout * 2)
            r = last_json(out)
            kind = "matched" if r["match_params"] else "heads_on_top"
            step.figures[kind] = r
            v = r["variants"]
            one, seq = v["n=1"], v["n=4 sequential"]
            text = (f"{kind}: {one['params'] / 1e9:.2f}B, n=4/n=1 {seq['ratio_to_n1']:.3f}x, "
                    f"{seq['tokens_per_s']:.0f} tok/s")
            if seq["mfu"] is not None:
                text += f", MFU n=1 {one['mfu']:.3f} n=4 {seq['mfu']:.3f}"
            off = v.get("n=4 sequential, fusions off")
            if off:
                text += f", fused/unfused {seq['median_s'] / off['median_s']:.3f}x"
            parts.append(text)
            if not r["losses_agree"]:
                raise StepFailed(f"naive and sequential losses differ ({kind})")
            if abs(r["flops_check_ratio"] - 1) > 1e-9:
                raise StepFailed(f"FLOP count disagrees with Megatron-LM's formula: ratio {r['flops_check_ratio']}")
        step.summary = "; ".join(parts)

    def generate(self, step: Step) -> None:
        # In fp32 on every device: a block of n positions and a single position run different kernels, and in bf16
        # a near-tie between the top two logits of a barely trained model can round either way; the exactness of
        # speculative decoding is a property of the algorithm, checked where rounding cannot flip an argmax.
        checkpoint = f"{self.work}/full/checkpoints/iter_{self.sizes.smoke_steps:07d}"
        _, out = self.run(step, self.python("-m", "mtp_megatron.generate", "--checkpoint", checkpoint, "--prompt",
                                      "def main(argv=None) -> int:\n    ", "--max-new-tokens",
                                      str(self.sizes.new_tokens), "--compare", "--device", self.args.device,
                                      "--dtype", "fp32"))
        report = last_json(out)
        _, out = self.run(step, self.python("bench/decode_speed.py", "--checkpoint", checkpoint, "--data", self.data,
                                      "--prompts", "8", "--prompt-tokens", "32", "--new-tokens",
                                      str(self.sizes.new_tokens), "--batch-sizes", "1", "8",
                                      "--device", self.args.device, "--dtype", "fp32"))
        batches = decode_table(out)
        step.figures = {"generate": report, "decode_speed": batches}
        step.summary = (f"generate --compare: identical, {report['speculative/tokens_per_forward']:.2f} tokens per "
                        f"forward, speedup {report['speedup']:.2f}x; decode_speed: "
                        + "; ".join(f"batch {b}: {r['tokens_per_forward']} tok/fwd, {r['speedup']}"
                                    for b, r in batches.items()))
        if set(batches) != {"1", "8"}:
            raise StepFailed(f"decode_speed reported batches {sorted(batches)}, expected 1 and 8")

    def deepspeed(self, step: Step) -> None:
        self._three_steps(step, "zero2", "ZeRO-2")

    def fsdp(self, step: Step) -> None:
        self._three_steps(step, "fsdp", "FSDP2")

    def _three_steps(self, step: Step, sharding: str, engine: str) -> None:
        """The tiny config for 3 steps under ``parallel.sharding=sharding``: the engine starts and steps here."""
        run_dir = f"{self.work}/{sharding}"
        self.run(step, self.train_command(run_dir, "train.iters=3", f"parallel.sharding={sharding}",
                                          "checkpoint.interval=0", synthetic=True))
        records = metrics(run_dir)
        step.figures = {"steps": len(records), "loss": [r["loss"] for r in records]}
        step.summary = f"{engine}, {len(records)} steps, loss " + " -> ".join(f"{r['loss']:.3f}" for r in records)
        if len(records) != 3:
            raise StepFailed(f"{len(records)} steps logged, expected 3")

    def plan(self) -> list:
        """(name, body, the steps it needs first), in the report's order."""
        return [("install", self.install, []), ("environment", self.environment, ["install"]),
                ("data", self.prepare_data, ["install"]), ("smoke", self.smoke, ["data"]),
                ("resume", self.resume, ["data"]),  # its interrupted run needs no smoke run; it waits for it later
                ("generate", self.generate, ["smoke"]), ("head_gradients", self.head_gradients, ["install"]),
                ("head_memory", self.head_memory, ["install"]), ("step_time", self.step_time, ["install"]),
                ("deepspeed", self.deepspeed, ["install"]), ("fsdp", self.fsdp, ["install"])]

    def run_all(self) -> None:
        """Every step once its prerequisites are done, in plan order, ``--jobs`` at a time (2 for the CPU smoke
        run only: on a GPU each measurement wants the device to itself)."""
        pending = [(name, body, deps) for name, body, deps in self.plan()
                   if not self.args.only or name in self.args.only or name in ("install", "environment")]
        chosen = {name for name, _, _ in pending}

        def ready(deps) -> bool:
            return all(self.finished[d].is_set() for d in deps if d in chosen)

        def worker() -> None:
            while True:
                with self.lock:
                    if not pending:
                        return
                    task = next((t for t in pending if ready(t[2])), None)
                    if task is not None:
                        pending.remove(task)
                if task is None:
                    time.sleep(0.2)
                    continue
                self.step(task[0], task[1])
                self.finished[task[0]].set()

        threads = [threading.Thread(target=worker) for _ in range(self.args.jobs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    # -- report --------------------------------------------------------------------------------------------------

    def report(self, total: float) -> int:
        steps = [self.steps[name] for name, _, _ in self.plan() if name in self.steps]
        machine = self.steps["environment"].figures if "environment" in self.steps else {}
        passed = all(s.status != "failed" for s in steps)
        data = {"device": self.args.device, "quick": self.args.quick, "host": platform.node(), "machine": machine,
                "passed": passed, "seconds": total,
                "steps": [{k: v for k, v in s.__dict__.items() if k != "log"} for s in steps]}
        with open(os.path.join(self.args.out, "report.json"), "w") as f:
            json.dump(data, f, indent=1)
        lines = [f"# GPU check: {'passed' if passed else 'FAILED'} ({self.args.device}"
                 f"{', quick' if self.args.quick else ''}, {total:.0f} s)", "",
                 "machine: " + (", ".join(f"{k} {v}" for k, v in machine.items() if v is not None) or "unknown"),
                 "", "| step | status | seconds | result |", "|---|---|---:|---|"]
        for s in steps:
            lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.summary.replace('|', '/')} |")
        with open(os.path.join(self.args.out, "report.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0 if passed else 1


def diff_checkpoints(a: str, b: str) -> dict:
    """Every entry of two checkpoints' torch-distributed files (weights, optimizer state, RNG and data-iterator
    states; not common.pt, which names the run folder) compared exactly: {"entries": N, "differ": [names]}."""
    import io

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    def load(path):
        with tempfile.TemporaryDirectory() as scratch:
            dcp_to_torch_save(path, os.path.join(scratch, "all.pt"))
            return torch.load(os.path.join(scratch, "all.pt"), weights_only=False)

    def same(x, y) -> bool:
        if isinstance(x, io.BytesIO) and isinstance(y, io.BytesIO):
            x, y = (torch.load(io.BytesIO(v.getvalue()), weights_only=False) for v in (x, y))
        if torch.is_tensor(x) or torch.is_tensor(y):
            return torch.is_tensor(x) and torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        if type(x).__module__ == "numpy" or type(y).__module__ == "numpy":
            import numpy

            return numpy.array_equal(numpy.asarray(x), numpy.asarray(y))
        return x == y

    first, second = load(a), load(b)
    differ = sorted(set(first) ^ set(second))
    differ += [k for k in first if k in second and not same(first[k], second[k])]
    return {"entries": len(first), "differ": differ}


def last_json(output: str) -> dict:
    """The last line of ``output`` that is a JSON object (the tools' machine-readable summary)."""
    for line in reversed(output.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise StepFailed("no JSON summary in the output (see gpu_check.log)")


def metrics(run_dir: str) -> list[dict]:
    """The training records of ``<run_dir>/metrics.jsonl`` (validation records left out), in step order."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if "loss/head_1" in r]


def decode_table(output: str) -> dict:
    """bench/decode_speed.py's table rows by batch size: tokens per forward and speedup."""
    rows = {}
    for line in output.splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|\s*([\d.]+)\s*\|[^|]*\|[^|]*\|[^|]*\|\s*([\d.]+x)\s*\|", line)
        if match:
            rows[match.group(1)] = {"tokens_per_forward": float(match.group(2)), "speedup": match.group(3)}
    return rows


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="default: %(default)s")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI on CPU)")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "runs", "gpu_check"),
                        help="report folder (default: $OUT when set, else runs/gpu_check)")
    parser.add_argument("--wheels", default=os.path.join(REPO, ".whl"),
                        help="megatron-core wheel, DeepSpeed sdist and their missing dependencies (default .whl/)")
    parser.add_argument("--work", default=None, help="scratch folder for data, runs and installs (default: a new "
                                                     "temporary folder, removed at the end)")
    parser.add_argument("--jobs", type=int, choices=[1, 2], default=None,
                        help="1: every step after the other; 2: the training chain beside the benchmarks "
                             "(default: 2 with --device cpu --quick, else 1)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these steps (install and environment "
                                                                "always run)")
    parser.add_argument("--diff-checkpoints", nargs=2, metavar=("A", "B"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jobs is None:
        args.jobs = 2 if args.device == "cpu" and args.quick else 1
    if args.diff_checkpoints:  # a step's helper process
        print(json.dumps(diff_checkpoints(*args.diff_checkpoints)))
        return 0
    check = Check(args)
    start = time.perf_counter()
    check.run_all()
    code = check.report(time.perf_counter() - start)
    check.log.close()
    if args.work is None:
        shutil.rmtree(check.work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
