"""Execute a plan: stream every tensor from the source into its planned place.

Work is cut into items (a row block of a tensor to quantize, or a byte range to
copy); a pool of threads runs them, each item doing pread -> fused kernel ->
pwrite at the planned offset. The kernels and the I/O release the GIL, so
reading, quantizing and writing overlap across items. At most ``2 x threads``
items are in flight, so memory stays flat whatever the model size. Offsets are
fixed by the plan, so the output is byte-identical for any thread count.

A finished shard is fsynced, renamed into place, hashed and recorded in the
journal by a background finisher while the next shard is converted.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import threading
import time
import warnings
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__, activations
from .errors import QStreamError
from .journal import open_journal
from .plan.plan import Op, OutShard, Plan
from .safetensors_io import DTYPES, ShardReader, TensorInfo, drop_pages
from .schemes import decode  # the FP4 decoders (compressed-tensors' decode, bit for bit)
from .schemes import ATTN_SCHEMES
from .writer import STAGING_DIR, ShardWriter, copy_side_file, output_config, write_atomic, write_json

BLOCK_BYTES = 16 << 20  # source bytes per work item
# NVFP4 needs a tensor's (or its fused partners') absmax before its first block can be
# quantized: the blocks read for it are kept, up to this many bytes, and quantized from
# memory, so that a tensor is read from the source once (blocks past the limit are read again)
HOLD_BYTES = 512 << 20


def _kernels():
    """The fused numba kernels; the numpy spec (:mod:`qstream.schemes.reference`, byte-identical,
    far slower) when QSTREAM_KERNELS=reference asks for it or numba is not installed at all.
    Any other failure to import the kernels is an error: a broken install must not silently
    make a conversion ~100x slower."""
    choice = os.environ.get("QSTREAM_KERNELS", "")
    if choice not in ("", "numba", "reference"):
        raise QStreamError(f"QSTREAM_KERNELS={choice!r} is not a kernel choice; set it to 'reference' "
                           "(the numpy spec) or 'numba', or unset it.")
    if choice != "reference":
        try:
            from .schemes import kernels  # fused numba kernels
            return kernels
        except ImportError as e:
            if not (isinstance(e, ModuleNotFoundError) and e.name == "numba" and importlib.util.find_spec("numba") is None):
                raise QStreamError(f"the fused kernels (qstream/schemes/kernels.py) cannot be imported "
                                   f"({e.__class__.__name__}: {e}); repair the numba install (pip install "
                                   "--force-reinstall numba), or set QSTREAM_KERNELS=reference to run the slow "
                                   "numpy reference instead.") from e
            warnings.warn("numba is not installed: qstream runs its numpy reference kernels (same bytes, "
                          "much slower); pip install numba for the fused kernels.", RuntimeWarning, stacklevel=2)
    from types import SimpleNamespace

    from .schemes import reference
    return SimpleNamespace(absmax=reference.tensor_absmax, quantize_nvfp4=reference.quantize_nvfp4,
                           quantize_mxfp4=reference.quantize_mxfp4)


@dataclass
class Progress:
    """Callbacks the CLI hooks into (rich bar on a terminal, plain lines otherwise).

    ``on_tensor`` is called once per tensor when all its bytes are written, and ``on_shard``
    when a shard is renamed into place; both may come from worker threads, never two at once."""

    on_start: Callable[[Plan], None] = lambda plan: None
    on_tensor: Callable[[Op, int], None] = lambda op, nbytes: None
    on_shard: Callable[[Path], None] = lambda path: None
    on_note: Callable[[str], None] = lambda msg: None


class Hooks:
    """Where the source and output meet the outside world (the Hub, a low-disk policy).

    ``fetch`` is called before the first read of a source file, ``before_shard``
    before each output shard is started (on the converting thread), ``release`` once
    every tensor that needs it (fused partners included) has been written,
    ``shard_done`` when an output shard is complete and renamed, and ``finished``
    after the small files (index, config, card, side files) are written.
    """

    def fetch(self, path: Path) -> None: ...

    def release(self, path: Path) -> None: ...

    def before_shard(self, index: int) -> None:
        """Called on the converting thread before output shard ``index`` is started;
        may block (e.g. until earlier shards are uploaded) to bound disk use."""

    def shard_done(self, path: Path) -> None: ...

    def finished(self, dst: Path) -> None: ...


@dataclass
class Result:
    seconds: float
    bytes_in: int
    bytes_out: int
    quantized: int
    passed: int
    shards: list[Path] = field(default_factory=list)
    resumed: int = 0  # shards kept from an earlier run
    measured: dict = field(default_factory=dict)  # "role/scheme" -> [sum w^2, sum (w - w_hat)^2, tensors]


def _rows_per_block(info: TensorInfo, block_bytes: int) -> int:
    row_bytes = math.prod(info.shape[1:]) * DTYPES[info.dtype].itemsize if len(info.shape) > 1 else 1
    return max(1, block_bytes // max(1, row_bytes))


class Executor:
    def __init__(self, plan: Plan, dst: Path, *, threads: int | None = None, block_bytes: int = BLOCK_BYTES,
                 hooks: Hooks | None = None, resume: bool = False, hold_bytes: int = HOLD_BYTES, calibrated=None) -> None:
        self.plan = plan
        self.calibrated = calibrated  # calibrate.CalibratedWeights: GPTQ codes and scales to write (--calibrate)
        if calibrated is not None:  # NVFP4 W4A4: the input absmax the same GPTQ pass recorded (one pass)
            activations.set_input_amax(plan, calibrated.input_absmax())
        self.dst = dst
        self.threads = max(1, threads or os.cpu_count() or 1)
        self.block_bytes = block_bytes
        self.hooks = hooks or Hooks()
        self.resume = resume
        self.reader = ShardReader(on_open=self.hooks.fetch)
        self.k = _kernels()
        self._global_scales: dict[str, np.float32] = {}
        self._scales: dict[str, np.ndarray] = {}  # FP8 source scales of the ops being converted
        self._scales_lock = threading.Lock()
        self._progress_lock = threading.Lock()  # Progress callbacks come from worker threads, one at a time
        self._by_module = {op.module: op for op in plan.ops if op.scale_group}
        self.hold_bytes = hold_bytes
        # (id(op), r0, r1) -> (read_float rows, or an FP8 source's raw codes; whether codes)
        self._held: dict[tuple[int, int, int], tuple[np.ndarray, bool]] = {}
        self._held_bytes = 0
        self._held_lock = threading.Lock()
        # (id(op), r0) -> (sum w^2, sum (w - w_hat)^2) of every block written: the card's measured error
        self._err: dict[tuple[int, int], tuple[float, float]] = {}
        self.measured: dict[str, list] = {}

    def _measure(self, op: Op, r0: int, w: np.ndarray, w_hat: np.ndarray) -> None:
        """Record one block's error against its decoded values (FP8: ``w_hat`` as given)."""
        w = np.asarray(w, dtype=np.float32).ravel()
        self._err[(id(op), r0)] = (float(np.dot(w, w)), float(np.sum(np.square(w - np.ravel(w_hat)))))

    def _measure_fp4(self, op: Op, r0: int, x: np.ndarray, packed: np.ndarray, scale: np.ndarray, gs) -> None:
        """Record one FP4 block's error, decoded as compressed-tensors decodes it (one fused pass)."""
        from .schemes import measure  # numba-compiled, like the kernels: imported once _kernels() has chosen
        self._err[(id(op), r0)] = measure.fp4_error(x, packed, scale, gs, decode._E8M0_BF16)

    def _shard_measured(self, ops: list[Op]) -> dict[str, list]:
        """Per "role/scheme": [sum w^2, sum err^2, tensors] over a shard's ops, in plan order (any --threads)."""
        out: dict[str, list] = {}
        for op in ops:
            if not op.converted:
                continue
            key = f"{op.role}/{op.module_scheme.split(':')[0]}"
            acc = out.setdefault(key, [0.0, 0.0, 0])
            acc[2] += 1
            for r0, _ in (self._blocks(op) if op.kind in ("quantize", "fp8") else ()):
                a, b = self._err.pop((id(op), r0), (0.0, 0.0))
                acc[0] += a
                acc[1] += b
        return out

    # ---------------------------------------------------------------- reading
    def _blocks(self, op_or_info):
        """Row ranges of at most ``block_bytes`` (aligned to FP8 scale blocks)."""
        info = op_or_info.source if isinstance(op_or_info, Op) else op_or_info
        if isinstance(op_or_info, Op) and op_or_info.view is not None:
            v = op_or_info.view
            step = v.count if v.transpose else max(1, self.block_bytes // (4 * v.in_dim))
            for e in range(v.experts):  # stacked experts: blocks within one expert each
                for r0 in range(0, v.count, step):
                    yield e * v.count + r0, e * v.count + min(v.count, r0 + step)
            return
        rows = info.shape[0]
        step = _rows_per_block(info, self.block_bytes)
        if isinstance(op_or_info, Op) and op_or_info.src_scale is not None:
            step = max(1, self.block_bytes // (4 * max(1, info.shape[1])))  # decoded to float32
            if op_or_info.block:
                b0 = op_or_info.block[0]
                step = max(b0, step // b0 * b0)
        if isinstance(op_or_info, Op) and op_or_info.kind == "fp8":  # whole blocks of the output encoding
            align = math.lcm(ATTN_SCHEMES[op_or_info.scheme].row_align, (op_or_info.block or (1,))[0])
            step = max(align, step // align * align)
        for r0 in range(0, rows, step):
            yield r0, min(rows, r0 + step)

    def _scale(self, op: Op) -> np.ndarray:
        """The op's FP8 source scale as float32, read once for all the pool threads that need it
        (scale tensors are small: the lock is held while reading) and kept until :meth:`forget`."""
        with self._scales_lock:
            s = self._scales.get(op.src_scale.name)
            if s is None:
                s = self.reader.read(op.src_scale).astype(np.float32)
                self._scales[op.src_scale.name] = s
            return s

    def forget(self, op: Op) -> None:
        """The op is done with its source: drop its cached FP8 scale."""
        if op.src_scale is not None:
            with self._scales_lock:
                self._scales.pop(op.src_scale.name, None)

    def read_view(self, info: TensorInfo, op: Op, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of a view's [count, ...] matrix from one expert of a fused tensor (of a
        stacked view's [experts * count, ...] rows: within one expert, see _blocks)."""
        v = op.view
        e, r0 = divmod(r0, v.count)
        r1 -= e * v.count
        per_expert = math.prod(info.shape[1:])
        dt = DTYPES[info.dtype]
        base = info.begin + (v.expert + e) * per_expert * dt.itemsize
        if v.transpose:  # [in, out_total] slab: read it whole, pick the columns, transpose
            slab_shape = info.shape[1:]
            buf = np.empty(per_expert * dt.itemsize, np.uint8)
            self.reader.read_bytes(info.path, base, buf.nbytes, memoryview(buf))
            slab = buf.view(dt).reshape(slab_shape)
            cols = slab[:, v.start + v.step * r0: v.start + v.step * (r1 - 1) + 1: v.step]
            return np.ascontiguousarray(cols.T)
        row_elems = per_expert // info.shape[1]
        first = v.start + v.step * r0
        n_src = v.step * (r1 - r0 - 1) + 1
        buf = np.empty(n_src * row_elems * dt.itemsize, np.uint8)
        self.reader.read_bytes(info.path, base + first * row_elems * dt.itemsize, buf.nbytes, memoryview(buf))
        rows = buf.view(dt).reshape((n_src,) + tuple(info.shape[2:]))
        return rows[:: v.step] if v.step > 1 else rows

    def read_mxfp4_rows(self, op: Op, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """gpt-oss MXFP4 rows of a view: (packed uint8 [n, in/2], E8M0 scales uint8 [n, in/32])."""
        packed = self.read_view(op.source, op, r0, r1).reshape(r1 - r0, -1)
        scales = self.read_view(op.src_scale, op, r0, r1).reshape(r1 - r0, -1)
        return np.ascontiguousarray(packed), np.ascontiguousarray(scales)

    def read_float(self, op: Op, r0: int, r1: int) -> np.ndarray:
        """Rows of the op's (logical 2-D) source as floats: the source dtype itself, or the
        exact float32 values of an FP8 (fp8 x scale) or MXFP4 (e2m1 x 2^e) source."""
        if op.layout == "mxfp4":
            from .schemes import reference

            return reference.dequantize_mxfp4(*self.read_mxfp4_rows(op, r0, r1))
        x = self.read_view(op.source, op, r0, r1) if op.view is not None else self.reader.read_rows(op.source, r0, r1)
        if op.src_scale is None:
            return x
        return self.k.fp8_dequant(x, self._scale(op), op.layout, r0, op.block)  # = fp8.apply_scale(decode_fp8)

    def _nonfinite(self, op: Op) -> QStreamError:
        bad = 0
        for r0, r1 in self._blocks(op):
            bad += int((~np.isfinite(self.read_float(op, r0, r1).astype(np.float32))).sum())
        info = op.source
        return QStreamError(
            f"tensor {info.name!r} ({info.path.name}) contains {bad} NaN/Inf values; it cannot be "
            "quantized: fix the source weights or exclude it with --ignore."
        )

    def tensor_absmax(self, op: Op, hold: bool = False) -> float:
        """max |w| of the op's source; ``hold``: keep the blocks read (see HOLD_BYTES) for
        :meth:`take_rows`. An FP8 source's blocks are held as their codes (a byte a value,
        decoded when taken), and a per-tensor-scaled one's absmax comes from its codes."""
        amax = 0.0
        codes_only = op.src_scale is not None and op.view is None and op.layout in ("tensor", "channel", "block")
        for r0, r1 in self._blocks(op):
            if codes_only:
                x = self.reader.read_rows(op.source, r0, r1)
                a = self.k.fp8_absmax(x, self._scale(op)) if op.layout == "tensor" else \
                    float(self.k.absmax(self.k.fp8_dequant(x, self._scale(op), op.layout, r0, op.block)))
            else:
                x = self.read_float(op, r0, r1)
                a = float(self.k.absmax(x))
            if not math.isfinite(a):
                raise self._nonfinite(op)
            amax = max(amax, a)
            if hold:
                with self._held_lock:
                    if self._held_bytes + x.nbytes <= self.hold_bytes:
                        self._held[(id(op), r0, r1)] = (x, codes_only)
                        self._held_bytes += x.nbytes
        return amax

    def take_rows(self, op: Op, r0: int, r1: int) -> np.ndarray:
        """read_float(op, r0, r1), from the blocks kept by the absmax pass when it holds them."""
        with self._held_lock:
            held = self._held.pop((id(op), r0, r1), None)
            if held is not None:
                self._held_bytes -= held[0].nbytes
        if held is None:
            return self.read_float(op, r0, r1)
        x, codes = held
        return self.k.fp8_dequant(x, self._scale(op), op.layout, r0, op.block) if codes else x

    def global_scale(self, op: Op) -> np.float32:
        """NVFP4 global scale of the op's scale group (fused partners share it)."""
        key = op.scale_group
        assert key is not None
        gs = self._global_scales.get(key)
        if gs is None:
            from .schemes import reference

            members = [self._by_module[n] for n in self.plan.scale_groups[key]]
            amax = max(self.tensor_absmax(m, hold=True) for m in members)
            for m in members:  # a partner's rows not held are read again, with its scale, when it runs
                if m is not op:
                    self.forget(m)
            dtype = np.float32 if op.src_scale is not None or op.layout else DTYPES[op.source.dtype].type
            gs = reference.nvfp4_global_scale(amax, dtype)
            self._global_scales[key] = gs
        return gs

    # ---------------------------------------------------------------- work items
    def _items(self, op: Op, w: ShardWriter):
        """Callables that together write every output of ``op`` (each kind of op makes its own)."""
        return op.items(self, w)

    # ---------------------------------------------------------------- whole run
    def run(self, progress: Progress | None = None) -> Result:
        progress = progress or Progress()
        plan, dst = self.plan, self.dst
        t0 = time.perf_counter()
        staging = dst / STAGING_DIR
        staging.mkdir(parents=True, exist_ok=True)
        identity = {"source": plan.source.fingerprint(), "options": plan.options.key(), "version": __version__}
        journal, notes = open_journal(dst, staging, plan.fingerprint(), self.resume, identity)
        for n in notes:
            progress.on_note(n)
        for p in staging.glob("*.partial"):  # a killed run's half-written files: never resumed
            p.unlink(missing_ok=True)
        if any(op.kind == "quantize" for op in plan.ops) and kernels_cold(self.k):
            progress.on_note("compiling the FP4 kernels (numba, once after an install: about 20-40 s before "
                             "the first tensor moves; cached for later runs)")
        progress.on_start(plan)
        ops_by_shard: list[list[Op]] = [[] for _ in plan.shards]
        for op in plan.ops:
            ops_by_shard[op.outputs[0].shard].append(op)
        releases = self._release_points()

        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="qstream")
        finisher = ThreadPoolExecutor(1, thread_name_prefix="qstream-finish")
        slots = threading.BoundedSemaphore(2 * self.threads)
        finishing: list[Future] = []
        written: list[Path] = []
        measured: list[dict] = []  # per shard, in plan order
        resumed = 0
        current: ShardWriter | None = None
        try:
            for index, (shard, ops) in enumerate(zip(plan.shards, ops_by_shard)):
                to_release = [p for op in ops for p in releases.get(id(op), ())]
                if shard.filename in journal.shards:
                    resumed += 1
                    measured.append(journal.shards[shard.filename].get("measured") or {})
                    with self._progress_lock:  # a finisher thread may be reporting a shard meanwhile
                        for op in ops:
                            progress.on_tensor(op, op.bytes_in)
                    written.append(dst / shard.filename)
                    progress.on_note(f"{shard.filename}: already done (checksum verified), kept")
                    self._release(to_release)
                    self.hooks.shard_done(dst / shard.filename)
                    continue
                self.hooks.before_shard(index)
                current = ShardWriter(dst, shard)
                futures: list[Future] = []
                for op in ops:
                    items = list(self._items(op, current))
                    remaining = [len(items)]
                    lock = threading.Lock()

                    failed = [False]

                    def item_done(_f, op=op, remaining=remaining, lock=lock, failed=failed):
                        slots.release()
                        with lock:
                            remaining[0] -= 1
                            last = remaining[0] == 0
                            failed[0] = failed[0] or _f.cancelled() or _f.exception() is not None
                        if last:
                            self.forget(op)
                            if not failed[0]:  # every byte of the tensor is written: now it counts
                                with self._progress_lock:
                                    progress.on_tensor(op, op.bytes_in)
                        if last and op.view is None:  # its source bytes are done with: drop their pages now
                            for t in (op.source, op.src_scale):
                                if t is not None:
                                    self.reader.drop_range(t.path, t.begin, t.nbytes)

                    for item in items:
                        slots.acquire()
                        f = pool.submit(item)
                        f.add_done_callback(item_done)
                        futures.append(f)
                        if f.done() and f.exception():
                            break
                    self._raise_first(futures)
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                self._raise_first(futures)
                for op in ops:  # the source bytes of this shard are done with: keep the page cache flat
                    for t in (op.source, op.src_scale):
                        if t is not None:
                            self.reader.drop_range(t.path, t.begin, t.nbytes)
                self._release(to_release)
                sw, current = current, None
                # at most two shards wait for fsync + hash: an interrupt then loses little work
                pending = [f for f in finishing if not f.done()]
                if len(pending) >= 2:
                    wait(pending[:-1])
                m = self._shard_measured(ops)
                measured.append(m)
                finishing.append(finisher.submit(self._finish_shard, sw, shard, journal, progress, m))
                self._raise_first(finishing)
            for f in finishing:
                written.append(f.result())
            self.measured = merge_measured(measured)
            self.write_small_files()
            journal.complete = True
            journal.save()
            self.hooks.finished(dst)
            # Finished: only the journal stays (where `hf upload DST` does not take it), for a later
            # --resume that re-checks the shards; downloads and half-written files go.
            shutil.rmtree(staging / "downloads", ignore_errors=True)
            for p in staging.glob("*.partial"):
                p.unlink(missing_ok=True)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            finisher.shutdown(wait=True, cancel_futures=True)
            if current is not None:
                current.abort()
            for p in staging.glob("*.partial"):  # half-written: never resumed, only a hidden waste of disk
                p.unlink(missing_ok=True)
            raise
        finally:
            pool.shutdown(wait=True)
            finisher.shutdown(wait=True)
            self._held.clear()
            self.reader.close()
            with self._scales_lock:
                self._scales.clear()
        return Result(
            seconds=time.perf_counter() - t0,
            bytes_in=plan.bytes_in,
            bytes_out=plan.bytes_out,
            quantized=plan.quantized,
            passed=len(plan.ops) - plan.quantized,
            shards=sorted(set(written)),
            resumed=resumed,
            measured=self.measured,
        )

    @staticmethod
    def _raise_first(futures: list[Future]) -> None:
        for f in futures:
            if f.done() and f.exception() is not None:
                raise f.exception()

    def _release(self, paths: list[Path]) -> None:
        for p in paths:
            self.reader.drop(p)
            self.hooks.release(p)

    def _finish_shard(self, sw: ShardWriter, shard: OutShard, journal, progress: Progress, measured: dict) -> Path:
        path = sw.finish()  # hashed while it was written (ShardWriter), fsynced, renamed
        journal.record(shard.filename, path.stat().st_size, sw.sha256(), measured=measured)
        drop_pages(path)
        with self._progress_lock:
            progress.on_shard(path)
        self.hooks.shard_done(path)
        return path

    def _release_points(self) -> dict[int, list[Path]]:
        """For each op, the source files whose last reader it is (fused partners count:
        a scale group's global scale is computed at its first op, reading every member)."""
        last: dict[Path, Op] = {}
        seen_groups: set[str] = set()
        for op in self.plan.ops:
            last[op.source.path] = op
            if op.src_scale is not None:
                last[op.src_scale.path] = op
            if op.scale_group and op.scale_group not in seen_groups:
                seen_groups.add(op.scale_group)
                for name in self.plan.scale_groups[op.scale_group]:
                    last[self._by_module[name].source.path] = op  # read now; its own later ops move this on
        out: dict[int, list[Path]] = {}
        for path, op in last.items():
            out.setdefault(id(op), []).append(path)
        return out

    def write_small_files(self) -> None:
        from .publish.card import model_card

        plan, dst = self.plan, self.dst
        for rel in plan.source.side_files:
            copy_side_file(plan.source.root, rel, dst)
        write_json(dst / "model.safetensors.index.json", plan.index())
        if plan.options.format == "modelopt":  # TensorRT-LLM (and vLLM without config.json's copy) read this
            from .layouts.modelopt import HF_QUANT_CONFIG, hf_quant_config
            write_json(dst / HF_QUANT_CONFIG, hf_quant_config(plan.quantization_config))
        write_atomic(dst / "README.md", model_card(plan, self.measured))
        # config.json last: a folder that holds it is a finished conversion
        fp4 = any(s in ("nvfp4", "mxfp4") for s in plan.schemes())
        write_json(dst / "config.json", output_config(plan.source.config, plan.quantization_config, fp4=fp4))


def merge_measured(per_shard: list[dict]) -> dict[str, list]:
    """The shards' measured errors summed in shard order (deterministic floats)."""
    out: dict[str, list] = {}
    for m in per_shard:
        for key, (a, b, n) in sorted(m.items()):
            acc = out.setdefault(key, [0.0, 0.0, 0])
            acc[0] += a
            acc[1] += b
            acc[2] += n
    return dict(sorted(out.items()))


def kernels_cold(k) -> bool:
    """Whether numba has no cached build of the fused kernels yet (the first run compiles them)."""
    path = getattr(k, "__file__", None)
    if not path:
        return False  # the numpy reference: nothing to compile
    name = Path(path).stem  # "kernels": its numba code is in kernels_nvfp4 / kernels_mxfp4 / kernels_common
    dirs = [Path(path).parent / "__pycache__"]
    if os.environ.get("NUMBA_CACHE_DIR"):
        dirs = [Path(os.environ["NUMBA_CACHE_DIR"])]
    return not any(next(d.rglob(f"{name}_*.nbi"), None) for d in dirs if d.is_dir())


def convert(plan: Plan, dst: Path, progress: Progress | None = None, **kw) -> Result:
    return Executor(plan, dst, **kw).run(progress)
