"""One decode step's attention over a KV cache: jaxunlearn vs torch, and vs the layout before.

A greedy decode step of the evaluation's benchmark model (32 rows, 8 query heads over 4
key/value heads of 64 dims) attends one query per row over S cached slots in each of 6
layers. Timed, interleaved and quiet-gated like the other benchmarks:

- ``jax``: `jaxunlearn.models.layers.cached_attention` on the library's cache layout (keys
  [B, KV, D, S], values [B, KV, S, D]; a decode step: broadcast products summed over
  head_dim, softmax, products summed over slots; XLA fuses each into one pass over the
  cache);
- ``jax_before``: the formulation generation used before (cache stored [B, S, KV, D],
  transposed to [B, KV, S, D] every step, then [G, D] x [D, S] batched matrix products);
- ``torch``: `torch.nn.functional.scaled_dot_product_attention(..., enable_gqa=True)` on
  a [B, H, S, D]-style cache [B, KV, S, D], what transformers' sdpa attention calls.

All three compute float32 scores and softmax; their outputs are compared (max |diff|).

The other half of a decode step, its weight matrix products, is timed the same way
(``projections``): the 43 products of one step of the benchmark model at 32 rows (per layer
q, k, v, o, gate, up, down, then the vocabulary head) chained as the model chains them, in
JAX on the library's [in, out] kernels and in torch with `F.linear` on transformers' [out,
in] weights. No design choice of the library enters this comparison: it is XLA:CPU's
matrix kernels against torch's (MKL / oneDNN) at the decode step's shapes.

    python benchmarks/bench_decode.py --json-out benchmarks/results/bench_decode.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from _quiet import Gate, add_gate_args, add_json_arg, format_ratio, ratio_entry, write_json
from bench_model import MODEL_SHAPE  # the benchmark model every benchmark uses

from jaxunlearn.models.layers import cached_attention

_SHAPE = {flag.lstrip("-"): value for flag, value in MODEL_SHAPE}
HIDDEN, INTERMEDIATE, VOCAB = _SHAPE["hidden"], _SHAPE["intermediate"], _SHAPE["vocab"]
KV, LAYERS = _SHAPE["kv-heads"], _SHAPE["layers"]
G, D = _SHAPE["heads"] // KV, HIDDEN // _SHAPE["heads"]
B = 32  # rows: the evaluation benchmark's batch


def _inputs(slots: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    q = rng.randn(LAYERS, B, 1, KV * G, D).astype(np.float32)
    k = rng.randn(LAYERS, B, KV, slots, D).astype(np.float32)
    v = rng.randn(LAYERS, B, KV, slots, D).astype(np.float32)
    allowed = rng.rand(B, 1, slots) > 0.2
    allowed[:, :, 0] = True
    return q, k, v, allowed


def _before(q, k, v, allowed, scale):
    # Before: slot-major cache transposed every step, then batched matrix products.
    b, _, h, d = q.shape
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # stored [B, S, KV, D] -> major
    q = q.reshape(b, KV, h // KV, d)
    scores = jnp.einsum("bkgd,bksd->bkgs", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(allowed[:, :, None, :], scores * scale, jnp.finfo(jnp.float32).min)
    out = jnp.einsum("bkgs,bksd->bkgd", jax.nn.softmax(scores, axis=-1), v)
    return out.reshape(b, 1, h, d)


def jax_fns(q, k, v, allowed):
    scale = D**-0.5
    allowed = jnp.asarray(allowed)
    # One array per layer, as the cache holds them (slicing a stacked array would copy).
    layers = lambda x: tuple(jnp.asarray(np.ascontiguousarray(x[i])) for i in range(LAYERS))  # noqa: E731
    # The library's cache layout (models/cache.py): keys [B, KV, D, S], values [B, KV, S, D].
    q, k_major, v_major = layers(q), layers(k.swapaxes(3, 4)), layers(v)
    # The "before" cache is stored slot-major: a real copy, so its per-step transpose is real.
    k_slot, v_slot = layers(k.transpose(0, 1, 3, 2, 4)), layers(v.transpose(0, 1, 3, 2, 4))

    @jax.jit
    def now(q, k, v):
        return jnp.stack(
            [cached_attention(q[i], k[i], v[i], allowed, scale) for i in range(LAYERS)]
        )

    @jax.jit
    def before(q, k, v):
        return jnp.stack([_before(q[i], k[i], v[i], allowed, scale) for i in range(LAYERS)])

    def run(fn, *args):
        return lambda: np.asarray(fn(*args).block_until_ready())

    return run(now, q, k_major, v_major), run(before, q, k_slot, v_slot)


def torch_fn(q, k, v, allowed):
    import torch
    import torch.nn.functional as F

    tq = torch.from_numpy(q).transpose(2, 3)  # [L, B, H, 1, D]
    tk, tv = torch.from_numpy(k), torch.from_numpy(v)
    mask = torch.from_numpy(allowed)[:, None]  # [B, 1, 1, S]

    def run():
        with torch.inference_mode():
            out = [
                F.scaled_dot_product_attention(tq[i], tk[i], tv[i], attn_mask=mask, enable_gqa=True)
                for i in range(LAYERS)
            ]
        return torch.stack(out).transpose(2, 3).numpy()  # [L, B, 1, H, D]

    return run


def _projection_weights(seed: int = 0) -> list[dict[str, np.ndarray]]:
    # Per layer, [in, out] float32 kernels as the library stores them; the last is the head.
    rng = np.random.RandomState(seed)
    shapes = {
        "q": (HIDDEN, KV * G * D),
        "k": (HIDDEN, KV * D),
        "v": (HIDDEN, KV * D),
        "o": (KV * G * D, HIDDEN),
        "gate": (HIDDEN, INTERMEDIATE),
        "up": (HIDDEN, INTERMEDIATE),
        "down": (INTERMEDIATE, HIDDEN),
    }
    draw = lambda shape: (rng.randn(*shape) / np.sqrt(shape[0])).astype(np.float32)  # noqa: E731
    layers = [{name: draw(shape) for name, shape in shapes.items()} for _ in range(LAYERS)]
    return layers + [{"head": draw((HIDDEN, VOCAB))}]


def projection_fns(weights, x):
    """One decode step's matrix products, JAX ([in, out] kernels) and torch (F.linear)."""
    import torch
    import torch.nn.functional as F

    def step(x, w, matmul, silu, cat):
        for layer in w[:-1]:
            q, k, v = matmul(x, layer["q"]), matmul(x, layer["k"]), matmul(x, layer["v"])
            x = x + matmul(q + cat(k, v), layer["o"])  # attention itself is timed above
            x = x + matmul(silu(matmul(x, layer["gate"])) * matmul(x, layer["up"]), layer["down"])
        return matmul(x, w[-1]["head"])

    jw = jax.tree.map(jnp.asarray, weights)
    jax_step = jax.jit(
        lambda x, w: step(x, w, jnp.matmul, jax.nn.silu, lambda a, b: jnp.concatenate([a, b], -1))
    )
    tw = [{k: torch.from_numpy(np.ascontiguousarray(v.T)) for k, v in d.items()} for d in weights]
    tx = torch.from_numpy(x)

    def run_jax():
        return np.asarray(jax_step(jnp.asarray(x), jw).block_until_ready())

    def run_torch():
        with torch.inference_mode():
            return step(tx, tw, F.linear, F.silu, lambda a, b: torch.cat([a, b], -1)).numpy()

    return run_jax, run_torch


def _ms_per_call(gate: Gate, fns: dict, repeats: int, calls: int) -> dict[str, float]:
    """Median milliseconds per call; each timed round makes enough calls to last >= 0.3 s,
    long enough for the gate to measure what other processes did meanwhile."""
    for f in fns.values():
        f()  # compile / warm up
        start = time.perf_counter()
        f()
        calls = max(calls, math.ceil(0.3 / max(time.perf_counter() - start, 1e-6)))
    rounds = {k: (lambda f=f: [f() for _ in range(calls)]) for k, f in fns.items()}
    times = gate.times(rounds, repeats)
    return {k: 1000 * statistics.median(v) / calls for k, v in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slots", type=int, nargs="+", default=[64, 256, 512])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calls", type=int, default=10, help="least calls per timed round")
    add_gate_args(p, max_wait=300.0)
    add_json_arg(p)
    args = p.parse_args(argv)
    import torch

    gate = Gate(args.gate, args.max_wait)
    rows = {}
    for slots in args.slots:
        inputs = _inputs(slots)
        now, before = jax_fns(*inputs)
        ref = torch_fn(*inputs)
        diff = max(float(np.abs(f() - ref()).max()) for f in (now, before))

        fns = {"jax": now, "jax_before": before, "torch": ref}
        ms = _ms_per_call(gate, fns, args.repeats, args.calls)
        rows[slots] = {"ms_per_step": ms, "max_abs_diff": diff}
    x = np.random.RandomState(1).randn(B, HIDDEN).astype(np.float32)
    weights = _projection_weights()
    run_jax, run_torch = projection_fns(weights, x)
    expected = run_torch()
    proj_diff = float(np.abs(run_jax() - expected).max() / np.abs(expected).max())
    proj = _ms_per_call(gate, {"jax": run_jax, "torch": run_torch}, args.repeats, args.calls)
    quiet = gate.record()
    for slots, row in rows.items():
        ms = row["ms_per_step"]
        row["torch_over_jax"] = ratio_entry(ms["torch"] / ms["jax"], quiet)
        row["before_over_jax"] = ratio_entry(ms["jax_before"] / ms["jax"], quiet)
        print(
            f"S={slots}: jax {ms['jax']:.2f} ms, before {ms['jax_before']:.2f} ms, torch "
            f"{ms['torch']:.2f} ms per step ({LAYERS} layers); torch/jax "
            f"{format_ratio(row['torch_over_jax'])}, before/jax "
            f"{format_ratio(row['before_over_jax'])}; max |diff| {row['max_abs_diff']:.1e}"
        )
    projections = {
        "products": sum(len(layer) for layer in weights),
        "ms_per_step": proj,
        "max_rel_diff": proj_diff,
        "torch_over_jax": ratio_entry(proj["torch"] / proj["jax"], quiet),
    }
    print(
        f"projections ({projections['products']} products, {B} rows): jax {proj['jax']:.2f} ms, "
        f"torch {proj['torch']:.2f} ms per step; torch/jax "
        f"{format_ratio(projections['torch_over_jax'])}; max rel diff {proj_diff:.1e}"
    )
    result = {
        "benchmark": "bench_decode",
        "shape": {
            "rows": B,
            "kv_heads": KV,
            "query_heads": KV * G,
            "head_dim": D,
            "layers": LAYERS,
        },
        "torch_threads": torch.get_num_threads(),
        "jax_backend": jax.default_backend(),
        "slots": {str(k): v for k, v in rows.items()},
        "projections": projections,
        "quiet_gate": quiet,
    }
    write_json(args.json_out, result)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
