"""Roofline model of fastdpo's LM-head log-probs, forward + backward: FLOP, HBM bytes and predicted ms per stage.

    python -m benchlib.roofline --md results/roofline.md     (from benchmarks/)

Sources: the FLOP of DESIGN.md's kernel math (8·N·H·V with one recompute; 6·N·H·V for a frozen head, no dW); the
loops, launch grids and chunking of the code itself: ``fastdpo/ops/chunked.py`` with
``fastdpo/kernels/logit_chunks.py`` (chunked), ``fastdpo/ops/torch_backend.py`` (torch: its row steps' bytes counted
op by op), and ``fastdpo/kernels/linear_lse_forward.py`` + ``linear_backward.py`` (fused) with their tiles from
``fastdpo.kernels.launch.default_config`` at sm_90.

- A kernel takes max(FLOP / rate, HBM bytes / bandwidth): compute and memory overlap inside one kernel; kernels run
  one after another, so a stage is the sum over its launches (one per chunk), not the max of sums.
- L2: nothing is assumed resident between kernels (each chunk's GEMM re-reads h from HBM: conservative). Inside
  the fused Triton kernels, programs resident at once share 16-bit W / h tiles through L2 (one HBM read per wave of
  programs) and a program re-reads its own tiles from L2 (optimistic for them); their fp32 dH / dW slices, read and
  rewritten for every (token tile, vocabulary tile) pair, go to HBM (working sets of 64 MiB and more). A fused grid
  of one-SM programs (255 registers × 256 threads fill an SM's register file) runs at programs / (SMs · waves) of
  the rate: the d weight kernel's 64-program launches use under half of 132 SMs. cuBLAS GEMMs get the full rate.
- Softcap (Gemma-2): inside a Triton kernel (chunked, fused) the tanh is negligible: ~3 MUFU operations a logit
  (tanh's exp and reciprocal, softmax's exp) at ~4 T/s on an H200, against 4–6 bytes a logit at 4.3 TB/s: hidden
  under the row kernel's memory time. On the torch path it is separate elementwise ops, counted as bytes.
- Rates: H200 measured on this workplace's machine (8192³ bf16 GEMM 769–798 TFLOP/s; device-to-device copy
  4.3 TB/s, bytes read + written; PyTorch reports 60 MB of L2). H100 SXM: NVIDIA's H100 datasheet (989 TFLOP/s
  dense bf16, 67 TFLOP/s fp32, 3.35 TB/s HBM3; 50 MB L2) at the H200's measured / peak fractions, 790/989 of the
  GEMM peak (the same chip and clocks) and 4.3/4.8 of the HBM peak. fp32 inputs run at the fp32 rate without TF32
  (PyTorch's default; the kernels follow it).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

from fastdpo.kernels.launch import default_config
from fastdpo.ops.chunked import chunk_plan


@dataclass(frozen=True)
class Device:
    name: str
    gemm_flops: float   # sustained dense bf16/fp16 tensor-core GEMM, FLOP/s
    fp32_flops: float   # sustained fp32 GEMM without TF32, FLOP/s
    hbm_bw: float       # sustained HBM bandwidth, bytes read + written per s
    l2_bytes: int
    sms: int
    arch: int = 90


GEMM_FRACTION, HBM_FRACTION = 790 / 989, 4.3 / 4.8
DEVICES = {
    "H200": Device("H200", 790e12, 67e12 * GEMM_FRACTION, 4.3e12, 60_000_000, 132),
    "H100": Device("H100 SXM", 989e12 * GEMM_FRACTION, 67e12 * GEMM_FRACTION, 3.35e12 * HBM_FRACTION, 50_000_000, 132),
}
DESIGNS = ("gemm-floor", "chunked", "fused", "torch")
# HBM bytes per logit of the torch path's row steps (fastdpo/ops/torch_backend.py; an fp32 read or write is 4).
# Forward: amax (r), sub_ (rw), exp_ (rw), sum (r). Backward: sub_, exp_, mul_ (rw each), then .to(16-bit) (read 4,
# write e; absent for fp32). Softcap (LogitTransform.apply: z / c, tanh, · c, rw each) adds 24 to both; its
# grad_scale (t = z·k, t·t, 1 − ·, · scale: rw each) and dz.mul_(scale) (r, r, w) add 44 more backward.
TORCH_BYTES = {"fwd": 24, "bwd": 24, "softcap_fwd": 24, "softcap_bwd": 68}


@dataclass
class Stage:
    name: str
    flop: float = 0.0
    bytes: float = 0.0
    ms: float = 0.0
    compute_ms: float = 0.0     # sums of the two bounds, to say which one dominates
    memory_ms: float = 0.0
    ideal_ms: float = 0.0       # the FLOP at the full GEMM rate: what the stage costs beyond it is overhead

    @property
    def bound(self) -> str:
        return "compute" if self.compute_ms >= self.memory_ms else "memory"


@dataclass
class Prediction:
    design: str
    stages: list[Stage]
    total_ms: float
    floor_ms: float
    ratio: float
    memory: dict[str, int] = field(default_factory=dict)    # extra buffers beyond inputs, outputs and gradients

    @property
    def dominant(self) -> Stage:
        return max(self.stages, key=lambda s: s.ms)


class _Stages(dict):
    def add(self, name, flop, nbytes, dev, rate, efficiency=1.0):
        """One kernel launch: max(compute, memory) added to its stage."""
        s = self.setdefault(name, Stage(name))
        c, m = flop / (rate * efficiency) * 1e3, nbytes / dev.hbm_bw * 1e3
        s.flop, s.bytes, s.ms = s.flop + flop, s.bytes + nbytes, s.ms + max(c, m)
        s.compute_ms, s.memory_ms, s.ideal_ms = s.compute_ms + c, s.memory_ms + m, s.ideal_ms + flop / rate * 1e3


def _pad(x: int, b: int) -> int:
    return math.ceil(x / b) * b


def _floor(st, n, h, v, frozen, e, dev, rate):
    st.add("fwd.gemm", 2 * n * h * v, e * (n * h + v * h + n * v), dev, rate)
    st.add("bwd.gemm_z", 2 * n * h * v, e * (n * h + v * h + n * v), dev, rate)
    st.add("bwd.gemm_dh", 2 * n * h * v, e * (n * v + v * h + n * h), dev, rate)
    if not frozen:
        st.add("bwd.gemm_dw", 2 * n * h * v, e * (n * v + n * h + v * h), dev, rate)
    return {}


def _chunked(st, n, h, v, frozen, e, dev, rate, scratch, softcap, torch_path=False):
    plan = chunk_plan(n, v, h, scratch)      # the code's own chunking
    v_c, n_tile = plan.v_chunk, plan.n_tile
    fwd_rows, bwd_rows = 4, 4 + e    # Triton row kernels: read z; read z, write dz over it
    if torch_path:
        fwd_rows = TORCH_BYTES["fwd"] + softcap * TORCH_BYTES["softcap_fwd"]
        bwd_rows = TORCH_BYTES["bwd"] + (4 + e if e != 4 else 0) + softcap * TORCH_BYTES["softcap_bwd"]
    tiled_dw = n_tile < n and e != 4     # token tiles sum d weight in an fp32 chunk, copied out once per chunk
    for v0 in range(0, v, v_c):
        vc = min(v_c, v - v0)
        for n0 in range(0, n, n_tile):
            nt = min(n_tile, n - n0)
            z_gemm = (2 * nt * h * vc, e * (nt * h + vc * h) + 4 * nt * vc)   # z written in fp32
            st.add("fwd.gemm", *z_gemm, dev, rate)
            st.add("fwd.rows", 0, fwd_rows * nt * vc + 24 * nt, dev, rate)    # + running max, sum, label logit
            st.add("bwd.gemm_z", *z_gemm, dev, rate)
            st.add("bwd.rows", 0, bwd_rows * nt * vc + 16 * nt, dev, rate)    # dz in place, in the input dtype
            dh_acc = (4 if v0 == 0 else 8) * nt * h                            # fp32 dH: the first chunk only writes
            st.add("bwd.gemm_dh", 2 * nt * h * vc, e * (nt * vc + vc * h) + dh_acc, dev, rate)
            if not frozen:   # token tiles after the first accumulate into dW_c: read it back
                out = (4 if tiled_dw else e) * vc * h * (2 if n0 else 1)
                st.add("bwd.gemm_dw", 2 * nt * h * vc, e * (nt * vc + nt * h) + out, dev, rate)
        if tiled_dw and not frozen:
            st.add("bwd.cast", 0, (4 + e) * vc * h, dev, rate)
    if e != 4:       # an fp32 input accumulates in dH itself
        st.add("bwd.cast", 0, (4 + e) * n * h, dev, rate)
    return {"scratch": 4 * n_tile * v_c, "fp32 dH": 4 * n * h if e != 4 else 0,
            "fp32 dW chunk": 4 * v_c * h if tiled_dw and not frozen else 0}


def _fused(st, n, h, v, frozen, e, dev, rate, scratch, softcap):
    cls = "fp32" if e == 4 else "16bit"
    waves = lambda programs: math.ceil(programs / dev.sms)
    occupancy = lambda programs: programs / (dev.sms * waves(programs))
    f = default_config("forward", cls, dev.arch)
    tiles_n = math.ceil(n / f.block_n)    # vocabulary splits as linear_lse_forward._num_splits picks them
    splits = max(1, min(max(1, math.ceil(v / (8 * f.block_v))), math.ceil(2 * dev.sms / tiles_n)))
    splits = math.ceil(v / _pad(math.ceil(v / splits), f.block_v))
    st.add("fwd.kernel", 2 * _pad(n, f.block_n) * _pad(v, f.block_v) * _pad(h, f.block_d),
           e * (n * h + v * h * waves(tiles_n)) + 4 * splits * n, dev, rate, occupancy(tiles_n * splits))
    st.add("fwd.label", 2 * n * h, 2 * e * n * h, dev, rate)      # indexed dot: h and one W row per token
    c = default_config("backward_dh", cls, dev.arch)
    programs = math.ceil(n / c.block_n)
    slices = 8 * n * h * math.ceil(v / c.block_v)    # each (token tile, vocab tile) pair: read + write fp32 dH rows
    st.add("bwd.dh", 4 * _pad(n, c.block_n) * _pad(v, c.block_v) * _pad(h, c.block_d),
           slices + e * (n * h + v * h * waves(programs)), dev, rate, occupancy(programs))
    st.add("bwd.misc", 0, 4 * n * h + ((4 + e) * n * h if e != 4 else 0), dev, rate)   # zero dH, cast it
    mem = {"fp32 dH": 4 * n * h if e != 4 else 0, "fp32 dW chunk": 0}
    if frozen:
        return mem
    c = default_config("backward_dw", cls, dev.arch)
    chunk = v if e == 4 else max(c.block_v, scratch // (4 * h) // c.block_v * c.block_v)
    mem["fp32 dW chunk"] = 4 * chunk * h if e != 4 else 0
    st.add("bwd.misc", 0, e * v * h, dev, rate)                  # torch.zeros of dW
    for v0 in range(0, v, chunk):
        vc = min(chunk, v - v0)
        programs = math.ceil(vc / c.block_v)
        st.add("bwd.dw", 4 * _pad(n, c.block_n) * _pad(vc, c.block_v) * _pad(h, c.block_d),
               8 * vc * h * math.ceil(n / c.block_n) + e * (vc * h + n * h * waves(programs)), dev, rate,
               occupancy(programs))
        if e != 4:   # zero the fp32 chunk, copy it into dW
            st.add("bwd.misc", 0, (8 + e) * vc * h, dev, rate)
    return mem


def predict(design: str, n: int, h: int, v: int, *, frozen: bool = False, dtype_bytes: int = 2,
            device: str | Device = "H200", scratch_bytes: int = 64 << 20, softcap: bool = False) -> Prediction:
    """FLOP, bytes and ms per stage of ``design`` (one of ``DESIGNS``) for N tokens, hidden H, vocabulary V;
    ``softcap``: Gemma-2's logit soft-capping."""
    dev = DEVICES[device] if isinstance(device, str) else device
    rate = dev.gemm_flops if dtype_bytes == 2 else dev.fp32_flops
    builders = {"gemm-floor": _floor, "chunked": _chunked, "fused": _fused,
                "torch": lambda *a: _chunked(*a, torch_path=True)}
    st = _Stages()
    args = (n, h, v, frozen, dtype_bytes, dev, rate)
    extra = () if design == "gemm-floor" else (scratch_bytes, softcap)
    memory = builders[design](st, *args, *extra)
    total = sum(s.ms for s in st.values())
    floor = total if design == "gemm-floor" else predict("gemm-floor", n, h, v, frozen=frozen,
                                                         dtype_bytes=dtype_bytes, device=dev).total_ms
    return Prediction(design, list(st.values()), total, floor, total / floor, memory)


HEADS = (("Llama-3-8B", 4096, 128256, False), ("Qwen2.5-7B", 3584, 152064, False), ("Gemma-2-2B", 2304, 256000, True))
NS = (4096, 8192, 32768)


def _table(header: str, rows) -> list[str]:
    return [header, "|---" * header.count(" | ") + "|---|", *rows]


def _rows(device: str, heads, ns, designs=DESIGNS, label="", **kw):
    for name, h, v, softcap in heads:
        for n in ns:
            for frozen in (False, True):
                for design in designs:
                    p = predict(design, n, h, v, frozen=frozen, device=device, softcap=softcap, **kw)
                    d, x = p.dominant, max(p.stages, key=lambda s: s.ms - s.ideal_ms)
                    yield (f"| {name} | {n} | {'frozen' if frozen else 'trained'} | {design}{label} | {p.total_ms:.1f} "
                           f"| {6 * n * h * v / p.total_ms / 1e9:.0f} | {p.ratio:.2f} | {d.name} ({d.bound}, "
                           f"{d.ms / p.total_ms:.0%}) | {x.name} +{x.ms - x.ideal_ms:.1f} ms |")


def _stages(n: int, h: int, v: int, frozen: bool):
    for p in (predict(design, n, h, v, frozen=frozen) for design in DESIGNS):
        yield from (f"| {p.design} | {s.name} | {s.flop / 1e12:.2f} | {s.bytes / 1e9:.2f} | {s.ms:.2f} | {s.bound} |"
                    for s in p.stages)
        yield (f"| {p.design} | **total** | {sum(s.flop for s in p.stages) / 1e12:.2f} | "
               f"{sum(s.bytes for s in p.stages) / 1e9:.2f} | **{p.total_ms:.2f}** | ×{p.ratio:.2f} of the floor |")


def _memory():
    for name, h, v, _ in HEADS:
        for n in NS:
            plan, c, f = chunk_plan(n, v, h, 64 << 20), predict("chunked", n, h, v), predict("fused", n, h, v)
            yield (f"| {name} | {n} | {plan.v_chunk} × {plan.n_tile} ({math.ceil(v / plan.v_chunk)}) | "
                   + " | ".join(f"{b / 2**20:.0f} MiB" for b in (*c.memory.values(), *f.memory.values())) + " |")


def render() -> str:
    head = "| head | N | lm_head | design | ms | TFLOP/s at 6·N·H·V | × floor | dominant stage | most time beyond its FLOP |"
    stage = "| design | stage | TFLOP | GB (HBM) | ms | bound |"
    llama, devices = HEADS[0][1:3], [f"- {d.name}: {d.gemm_flops / 1e12:.0f} TFLOP/s bf16 GEMM, {d.fp32_flops / 1e12:.0f} "
                                     f"TFLOP/s fp32, {d.hbm_bw / 1e12:.2f} TB/s HBM, {d.l2_bytes / 1e6:.0f} MB L2, "
                                     f"{d.sms} SMs" for d in DEVICES.values()]
    return "\n".join([
        "# Roofline model: LM-head log-probs, forward + backward, bf16", "",
        "Predictions, not measurements, written by `python -m benchlib.roofline --md results/roofline.md` (from "
        "`benchmarks/`). Designs: `gemm-floor`, 4 GEMMs (frozen head: 3) of the step's shapes, 8·N·H·V (6·N·H·V) "
        "FLOP at the GEMM rate; `chunked`, the new CUDA default; `fused`, today's Triton kernels (`backend=\"triton\"`);"
        " `torch`, the chunked loop with PyTorch row steps. TFLOP/s count 6·N·H·V (the peers' convention); × floor is "
        "against the GEMM floor of the same head (trained or frozen); \"most time beyond its FLOP\" is the stage whose "
        "time exceeds its FLOP at the GEMM rate the most. Gemma-2-2B rows include its logit softcap.", "", *devices, "",
        "## Assumptions (benchlib/roofline.py's docstring)", "", __doc__.split("\n\n", 2)[2].strip(), "",
        f"Bytes per logit of the torch row steps: forward {TORCH_BYTES['fwd']}, backward {TORCH_BYTES['bwd']} + 6 "
        f"(the cast of dz to bf16); softcap adds {TORCH_BYTES['softcap_fwd']} and {TORCH_BYTES['softcap_bwd']}. "
        "Chunked: the row kernels read the fp32 chunk (4) and, backward, write dz over it in bf16 (+2).", "",
        "## H200", "", *_table(head, _rows("H200", HEADS, NS)), "",
        "## H100 SXM (Llama-3-8B head)", "", *_table(head, _rows("H100", HEADS[:1], NS)), "",
        "## Per stage: Llama-3-8B head, N 8192, bf16, H200", "", "### lm_head trained", "",
        *_table(stage, _stages(8192, *llama, False)), "", "### lm_head frozen (no dW)", "",
        *_table(stage, _stages(8192, *llama, True)), "",
        "## Chunk size at long N", "",
        "A chunk of v_c rows makes the dH GEMM read and rewrite the fp32 dH (8·N·H bytes) for 2·N·H·v_c FLOP: "
        "~v_c / 4 FLOP a byte, under the H200's 184 once v_c < ~740. 64 MiB / (4·N) would give 512 rows at N 32768 "
        "(predicted 1.18× the floor trained, 1.24× frozen), so the code keeps at least `MIN_CHUNK` = 1024 rows and "
        "tiles the tokens instead, an fp32 dW chunk (4·v_c·H) summing the tiles inside the same 64 MiB "
        "(`fastdpo.ops.chunked.chunk_plan`; the N 32768 rows above).", "",
        "## Memory beyond inputs, outputs and gradients (bf16, 64 MiB scratch)", "",
        *_table("| head | N | chunk v_c × tokens (chunks) | chunked: fp32 logit scratch | chunked: fp32 dH | "
                "chunked: fp32 dW chunk | fused: fp32 dH | fused: fp32 dW chunk |", _memory()), "",
    ])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--md", help="write the tables here (default: print them)")
    md, text = parser.parse_args().md, render()
    Path(md).write_text(text) if md else print(text)
