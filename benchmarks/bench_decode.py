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

    python benchmarks/bench_decode.py --json-out benchmarks/results/bench_decode.json
"""

from __future__ import annotations

import argparse
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
from _quiet import Gate, add_gate_args, add_json_arg, format_ratio, ratio_entry, write_json

from jaxunlearn.models.layers import cached_attention

B, KV, G, D, LAYERS = 32, 4, 2, 64, 6


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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slots", type=int, nargs="+", default=[256, 512])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calls", type=int, default=10, help="calls per timed round")
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

        def many(f):
            return lambda: [f() for _ in range(args.calls)]

        fns = {"jax": many(now), "jax_before": many(before), "torch": many(ref)}
        times = gate.times(fns, args.repeats)
        ms = {k: 1000 * statistics.median(v) / args.calls for k, v in times.items()}
        rows[slots] = {"ms_per_step": ms, "max_abs_diff": diff}
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
        "quiet_gate": quiet,
    }
    write_json(args.json_out, result)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
