"""Ahead-of-time compile gate: every Triton kernel launch of medgrpo's launchers, compiled for a GPU without one.

A kernel that only passes under ``TRITON_INTERPRET=1`` is a bug the CPU tests cannot see: the
interpreter runs the kernel body as Python and never meets the real compiler's rules (a
loop-carried variable that changes type, a constexpr branch that does not type-check, a
tile that does not fit). This script finds them without a GPU:

1. It calls the real launchers of ``medgrpo/kernels`` with small CPU tensors, once for
   each dtype and feature-switch combination that the ops can pass them on CUDA (see
   ``LAUNCH_PLANS``), with ``JITFunction.run`` intercepted: every launch is recorded,
   nothing executes.
2. Each launch is specialized the way the JIT would specialize it on the GPU (Triton's
   own binder: argument types, constexprs, pointer-alignment attributes, options), and
   every distinct one is compiled with ``triton.compile(ASTSource(fn, signature,
   constexprs, attrs), target=GPUTarget("cuda", ARCH, 32))``, down to a cubin by the ptxas
   that ships in the triton wheel, in parallel processes, in a temporary cache.
3. Per launch it reports: compiled or the error, registers, spilled bytes, shared memory.

It exits 1 if any launch fails to compile or spills more than ``--max-spill-bytes``
(default 0: these are streaming kernels with small tiles, a spill means a tile or an
unrolled loop grew past the register file and is a performance bug), and 2 if it cannot
run at all (no NVIDIA backend or no ptxas in this triton). Every recorded launch is
required. ASTSource takes ``(fn, signature, constexprs, attrs)`` with signature and
constexprs keyed by argument name or index path in triton 3.6 and 3.9 alike.

    python bench/gpu/aot_compile.py [--arch 90] [--jobs N] [--json PATH] [--quiet] [--match REGEX]
"""

from __future__ import annotations

import os
import sys

# Real JIT functions (not the interpreter's), and ptxas's resource log printed into the captured output.
os.environ["TRITON_INTERPRET"] = "0"
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # compile this checkout's kernels, whatever medgrpo is installed

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from medgrpo.kernels import group_advantages as group_kernels  # noqa: E402
from medgrpo.kernels import linear_logprob as head_kernels  # noqa: E402
from medgrpo.kernels import normalize_rewards as normalize_kernels  # noqa: E402
from medgrpo.kernels import patchify as patchify_kernels  # noqa: E402
from medgrpo.kernels import policy_loss as loss_kernels  # noqa: E402
from medgrpo.ops import reference  # noqa: E402
from medgrpo.ops.group_advantages import SCALE_CODES  # noqa: E402
from medgrpo.ops.policy_loss import KL_CODES, LOSS_TYPE_CODES, PolicyLossConfig  # noqa: E402

warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")  # triton 3.9's notice, not ours

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the ops pass to Triton (fp64 -> reference)
DEFAULT_MAX_SPILL_BYTES = 0


# ------------------------------------------------------------------------------ recording launches
@dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)`` call, and where it came from."""

    plan: str
    fn: JITFunction
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recorded_launches(plan: str, into: list[Launch]) -> Iterator[None]:
    """Intercept ``JITFunction.run``: launches are appended to ``into``, never executed."""
    original = JITFunction.run

    def record(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        into.append(Launch(plan, self, args, kwargs))

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


# ------------------------------------------------------------------------------ what the ops launch
def _policy_inputs(rows: int, length: int, dtype, *, old, ref, mask_dtype=torch.bool, per_token_adv=False):
    logp = -torch.rand(rows, length).to(dtype)
    adv = torch.randn(rows, length) if per_token_adv else torch.randn(rows)
    mask = torch.ones(rows, length).to(mask_dtype)
    old_logp = None if old is None else logp.to(old)
    ref_logp = None if ref is None else logp.to(ref)
    return logp, adv.to(dtype), mask, old_logp, ref_logp


def _policy_launches(length: int, dtype, old, ref, kl: str, sequence: bool, loss_type: str = "dapo", **inputs):
    """policy_loss forward (rows + finalize) and backward, as medgrpo.ops.policy_loss calls them on CUDA."""
    config = PolicyLossConfig(
        loss_type=loss_type,
        epsilon_high=0.3,
        beta=0.04 if ref is not None else 0.0,
        kl_estimator=kl,
        importance_sampling="sequence" if sequence else "token",
        max_completion_length=length,
    )
    logp, adv, mask, old_logp, ref_logp = _policy_inputs(2, length, dtype, old=old, ref=ref, **inputs)
    hparams, modes = config.hparams(), config.modes()
    _, _, row_weight = loss_kernels.policy_loss_forward(logp, adv, mask, old_logp, ref_logp, None, hparams, modes)
    grad_loss = torch.ones((), dtype=torch.float32)
    loss_kernels.policy_loss_backward(grad_loss, logp, adv, mask, old_logp, ref_logp, row_weight, hparams, modes)


def plan_policy_loss() -> None:
    """medgrpo.policy_loss: every switch at the largest row block (T >= 1024), one of each at the smallest."""
    for dtype, has_old, kl, sequence in itertools.product(
        FLOAT_DTYPES, (False, True), (None, *KL_CODES), (False, True)
    ):
        old = dtype if has_old else None
        ref = dtype if kl is not None else None
        _policy_launches(2048, dtype, old, ref, kl or "k3", sequence)
    for dtype in FLOAT_DTYPES:
        _policy_launches(7, dtype, dtype, dtype, "k3", True)
        _policy_launches(7, dtype, dtype, dtype, "k3", False)
    for mask_dtype in (torch.int32, torch.int64, torch.float32, torch.bfloat16):  # bool (-> uint8) is above
        _policy_launches(300, torch.float32, torch.float32, None, "k3", False, mask_dtype=mask_dtype)
    _policy_launches(300, torch.bfloat16, torch.float32, torch.float32, "k3", True, per_token_adv=True)


def plan_policy_loss_finalize() -> None:
    """The finalize kernel: every loss type, with/without a num_items tensor, small and large batches."""
    for loss_type, rows in itertools.product(LOSS_TYPE_CODES, (3, 4096)):
        config = PolicyLossConfig(loss_type=loss_type, max_completion_length=8)
        logp, adv, mask, _, _ = _policy_inputs(rows, 8, torch.float32, old=None, ref=None)
        for items in (None, torch.tensor(100.0), torch.tensor(100)):
            if items is not None and loss_type != "dapo":
                continue
            loss_kernels.policy_loss_forward(logp, adv, mask, None, None, items, config.hparams(), config.modes())


def plan_fused_head_policy() -> None:
    """fused_linear_policy_loss's policy kernels: fp32 log-probs of packed tokens, user-dtype old/ref and mask.

    Token-level IS runs the backward kernel on (tokens, 1) columns with 2-D advantages;
    GSPO runs forward and backward on the scattered (B, T) fp32 log-probs.
    """
    for user_dtype, has_old, kl, mask_dtype in itertools.product(
        (torch.float32, torch.bfloat16), (False, True), (None, *KL_CODES), (torch.bool, torch.int32)
    ):
        old = user_dtype if has_old else None
        ref = user_dtype if kl is not None else None
        config = PolicyLossConfig(epsilon_high=0.3, beta=0.04 if ref else 0.0, kl_estimator=kl or "k3")
        logp, _, mask, old_logp, ref_logp = _policy_inputs(5, 1, torch.float32, old=old, ref=ref, mask_dtype=mask_dtype)
        adv = torch.randn(5, 1)
        grad_loss, row_weight = torch.ones((), dtype=torch.float32), torch.ones(5)
        loss_kernels.policy_loss_backward(
            grad_loss, logp, adv, mask, old_logp, ref_logp, row_weight, config.hparams(), config.modes()
        )
        if user_dtype == torch.bfloat16:  # GSPO on the scattered fp32 log-probs, bf16 old/ref
            _policy_launches(64, torch.float32, old, ref, kl or "k3", True, mask_dtype=mask_dtype)


def plan_linear_logprob() -> None:
    """The head's row kernels on logits chunks of each dtype: entropy on/off, its gradient on/off, V tiles."""
    for dtype, vocab in itertools.product(FLOAT_DTYPES, (37, 152064)):
        logits = torch.randn(3, vocab).to(dtype)
        targets = torch.zeros(3, dtype=torch.int64)
        for with_entropy in (False, True):
            logp, lse, entropy = head_kernels.logprob_forward(logits, targets, 0.7, with_entropy)
        grad = torch.ones(3)
        for grad_entropy in (None, grad):
            head_kernels.logprob_backward_(logits, targets, lse, entropy, grad, grad_entropy, 0.7)


def plan_normalize_rewards() -> None:
    """normalize_rewards: reward dtypes x key dtypes x stats in fp32 or the rewards' dtype."""
    for dtype, key_dtype in itertools.product(FLOAT_DTYPES, (torch.int64, torch.int32)):
        for stats_dtype in {torch.float32, dtype}:
            rewards, keys = torch.rand(10).to(dtype), torch.zeros(10, dtype=key_dtype)
            normalize_kernels.normalize_rewards(rewards, keys, torch.rand(2, 3).to(stats_dtype), 3.0)


def _group_launch(dtype, normalize: bool, scale: int, group_size: int, n: int) -> None:
    keys, stats = (torch.zeros(n, dtype=torch.int64), torch.rand(2, 3)) if normalize else (None, None)
    rewards = torch.rand(n).to(dtype)
    ids = None if group_size else torch.arange(n) // 4
    group_kernels.group_advantages(rewards, ids, group_size, keys, stats, 3.0, scale, 1e-4, reference.ZERO_STD_ATOL)


def plan_group_advantages() -> None:
    """group_advantages: every switch (normalize x scale) at the largest tiles, smaller tiles once, x dtype."""
    for dtype in FLOAT_DTYPES:
        for normalize, scale in itertools.product((False, True), SCALE_CODES.values()):
            _group_launch(dtype, normalize, scale, 2048, 2 * 2048)  # contiguous, one 2048-wide group per step
            _group_launch(dtype, normalize, scale, 0, 5000)  # group ids, 1024-element blocks
        for group_size, groups in ((8, 1), (8, 512), (1, 4096)):  # tiles 8x1, 8x128, 1x1024
            _group_launch(dtype, True, SCALE_CODES["group"], group_size, group_size * groups)
        _group_launch(dtype, True, SCALE_CODES["group"], 0, 5)  # group ids, 16-element blocks


def plan_patchify() -> None:
    """Qwen2.5-VL patchify: uint8 clips (contiguous and strided views) to each output dtype."""
    clip = torch.randint(0, 255, (2, 56, 56, 3), dtype=torch.uint8)
    strided = torch.randint(0, 255, (2, 56, 60, 3), dtype=torch.uint8)[:, :, 2:58]
    for dtype, frames in itertools.product(FLOAT_DTYPES, (clip, strided)):
        patchify_kernels.patchify(
            frames,
            dtype,
            reference.CLIP_MEAN,
            reference.CLIP_STD,
            reference.RESCALE_FACTOR,
            reference.PATCH_SIZE,
            reference.MERGE_SIZE,
            reference.TEMPORAL_PATCH_SIZE,
        )


LAUNCH_PLANS: dict[str, Callable[[], None]] = {
    "policy_loss": plan_policy_loss,
    "policy_loss_finalize": plan_policy_loss_finalize,
    "fused_linear_policy_loss": plan_fused_head_policy,
    "linear_logprob": plan_linear_logprob,
    "normalize_rewards": plan_normalize_rewards,
    "group_advantages": plan_group_advantages,
    "patchify": plan_patchify,
}


# ------------------------------------------------------------------------------ specialization
@dataclass
class Specialized:
    """A launch as the JIT would compile it for the target: what ASTSource and triton.compile take."""

    plan: str
    fn: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    label: str = ""
    result: dict = field(default_factory=dict)


def specialize(launch: Launch, backend) -> Specialized:
    """Triton's own binder and argument packing (as JITFunction.run does), for ``backend``'s target."""
    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound_args, specialization, options)
    names = [p.name for p in fn.params]
    switches = " ".join(f"{names[path[0]]}={value}" for path, value in sorted(constexprs.items()))
    pointers = " ".join(f"{n}={t}" for n, t in signature.items() if t.startswith("*"))
    label = f"{fn.__name__}[{switches}] warps={options.num_warps} {pointers}"
    return Specialized(launch.plan, fn, signature, constexprs, attrs, dict(options.__dict__), label)


def distinct(launches: list[Specialized]) -> list[Specialized]:
    """One per (kernel, signature, constexprs, alignment attributes, options)."""
    seen: dict[str, Specialized] = {}
    for s in launches:
        key = repr((s.fn.__module__, s.fn.__name__, s.signature, sorted(s.constexprs.items()), s.attrs, s.options))
        seen.setdefault(key, s)
    return list(seen.values())


# ------------------------------------------------------------------------------ compiling
PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")

_TO_COMPILE: list[Specialized] = []  # filled before the worker processes fork
_TARGET: Optional[GPUTarget] = None


def compile_one(index: int) -> dict:
    """Compile launch ``index`` of _TO_COMPILE for _TARGET; registers and spills from ptxas's log."""
    s = _TO_COMPILE[index]
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                ASTSource(s.fn, s.signature, s.constexprs, s.attrs), target=_TARGET, options=s.options
            )
    except Exception as error:  # noqa: BLE001 - every compiler failure is a gate failure, reported in full
        message = str(error).strip()
        return {"ok": False, "error": f"{type(error).__name__}: {message}", "seconds": time.perf_counter() - start}
    text = log.getvalue()
    registers = [int(r) for r in PTXAS_REGISTERS.findall(text)]
    spills = [int(a) + int(b) for a, b in PTXAS_SPILLS.findall(text)]
    return {
        "ok": True,
        "registers": max(registers) if registers else None,
        "spill_bytes": sum(spills) if spills else None,
        "shared_bytes": kernel.metadata.shared,
        "num_warps": kernel.metadata.num_warps,
        "seconds": time.perf_counter() - start,
    }


def check_toolchain(target: GPUTarget):
    """The target's backend, after asking its ptxas for a version: exit 2 if there is none."""
    try:
        backend = make_backend(target)
        backend.hash()  # runs `ptxas --version`
    except Exception as error:  # noqa: BLE001
        sys.exit(
            f"aot_compile: cannot compile for {target}: {type(error).__name__}: {error}\n"
            "The gate needs triton's NVIDIA backend and the ptxas shipped in the triton wheel "
            "(or TRITON_PTXAS_PATH pointing at one)."
        )
    return backend


def record_all(match: Optional[str], backend) -> list[Specialized]:
    launches: list[Launch] = []
    for name, plan in LAUNCH_PLANS.items():
        with recorded_launches(name, launches):
            plan()
    specialized = distinct([specialize(launch, backend) for launch in launches])
    if match:
        pattern = re.compile(match)
        specialized = [s for s in specialized if pattern.search(f"{s.plan}: {s.label}")]
    return specialized


def compile_all(specialized: list[Specialized], target: GPUTarget, jobs: int) -> None:
    global _TARGET
    _TO_COMPILE[:] = specialized
    _TARGET = target
    cache = tempfile.mkdtemp(prefix="medgrpo-aot-")
    os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: every launch really compiles, nothing is left behind
    try:
        if jobs <= 1:
            results = [compile_one(i) for i in range(len(specialized))]
        else:
            with multiprocessing.get_context("fork").Pool(jobs) as pool:
                results = pool.map(compile_one, range(len(specialized)), chunksize=1)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    for s, result in zip(specialized, results):
        s.result = result


# ------------------------------------------------------------------------------ report
def failures(specialized: list[Specialized], max_spill_bytes: int) -> list[tuple[Specialized, str]]:
    """The launches that fail the gate (compile error or spill), with why; each result records its ``failure``."""
    bad = []
    for s in specialized:
        why = None
        if not s.result["ok"]:
            why = s.result["error"].splitlines()[-1]
        elif (s.result["spill_bytes"] or 0) > max_spill_bytes:
            why = f"spills {s.result['spill_bytes']} bytes > {max_spill_bytes}"
        s.result["failure"] = why
        if why:
            bad.append((s, why))
    return bad


def print_report(specialized: list[Specialized], quiet: bool) -> None:
    if quiet:
        return
    print(f"{'status':8} {'regs':>4} {'spill':>5} {'smem':>6} {'s':>5}  plan: launch")
    for s in specialized:
        r = s.result
        if r["ok"]:
            print(
                f"{'ok':8} {r['registers'] or '?':>4} {r['spill_bytes'] or 0:>5} {r['shared_bytes']:>6} "
                f"{r['seconds']:>5.1f}  {s.plan}: {s.label}"
            )
        else:
            print(f"{'FAILED':8} {'':>4} {'':>5} {'':>6} {r['seconds']:>5.1f}  {s.plan}: {s.label}")
            print("    " + "\n    ".join(r["error"].splitlines()[-12:]))


def write_json(path: str, specialized: list[Specialized], target: GPUTarget, summary: dict) -> None:
    launches = [
        {
            "plan": s.plan,
            "kernel": f"{s.fn.__module__}.{s.fn.__name__}",
            "label": s.label,
            "signature": s.signature,
            "constexprs": {s.fn.arg_names[path[0]]: value for path, value in s.constexprs.items()},
            "num_warps": s.options.get("num_warps"),
            **s.result,
        }
        for s in specialized
    ]
    report = {"target": f"{target.backend}:{target.arch}", "triton": triton.__version__, **summary}
    Path(path).write_text(json.dumps({**report, "launches": launches}, indent=2, default=str) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100/H200), 80")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--json", metavar="PATH", help="write the per-launch report as JSON")
    parser.add_argument("--quiet", action="store_true", help="print only the summary and the failures")
    parser.add_argument("--match", metavar="REGEX", help="compile only launches whose 'plan: label' matches")
    parser.add_argument("--max-spill-bytes", type=int, default=DEFAULT_MAX_SPILL_BYTES, help="per-launch limit")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    target = GPUTarget("cuda", args.arch, 32)
    backend = check_toolchain(target)
    specialized = record_all(args.match, backend)
    if not specialized:
        print(f"aot_compile: no launch matches {args.match!r}", file=sys.stderr)
        return 1
    compile_all(specialized, target, max(args.jobs, 1))
    print_report(specialized, args.quiet)
    bad = failures(specialized, args.max_spill_bytes)
    ok = [s.result for s in specialized if s.result["ok"]]
    summary = {
        "launches": len(specialized),
        "compiled": len(ok),
        "failed": len(bad),
        "max_registers": max((r["registers"] or 0 for r in ok), default=0),
        "max_spill_bytes": max((r["spill_bytes"] or 0 for r in ok), default=0),
        "max_shared_bytes": max((r["shared_bytes"] for r in ok), default=0),
        "spill_limit_bytes": args.max_spill_bytes,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if args.json:
        write_json(args.json, specialized, target, summary)
    for s, why in bad:
        print(f"FAILED {s.plan}: {s.label}\n    {why}", file=sys.stderr)
    print(
        f"aot_compile: {summary['compiled']}/{summary['launches']} launches compiled for sm_{args.arch} "
        f"(triton {triton.__version__}), {len(bad)} failed; max {summary['max_registers']} registers, "
        f"{summary['max_spill_bytes']} spill bytes (limit {args.max_spill_bytes}), "
        f"{summary['max_shared_bytes']} B shared; {summary['seconds']} s with {args.jobs} jobs"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
