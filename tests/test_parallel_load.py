"""Tests for jaxunlearn.parallel and sharded checkpoint loading on 8 simulated CPU devices.

The 8-device part runs in a subprocess, because `jax_num_cpu_devices` must be set before
JAX first initialises its backends and the pytest process has usually done that already.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P

from jaxunlearn import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "shape, fsdp, spec",
    [
        ((128, 64), 4, P("fsdp", None)),  # largest dimension
        ((64, 128), 4, P(None, "fsdp")),
        ((64, 64), 8, P("fsdp", None)),  # ties: the first
        ((96, 64), 64, P(None, "fsdp")),  # 96 is larger but not divisible by 64
        ((6, 10), 4, P()),  # nothing divisible: replicate
        ((64,), 8, P("fsdp")),
        ((), 8, P()),
        ((128, 64), 1, P()),  # no fsdp axis to use
    ],
)
def test_fsdp_spec(shape, fsdp, spec):
    assert parallel.fsdp_spec(shape, fsdp) == spec


SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    import numpy as np
    import pytest
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from jaxunlearn import checkpoints, parallel

    hf_dir, work = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 8, jax.devices()
    ids = np.random.RandomState(0).randint(0, 128, (8, 9)).astype(np.int32)

    def logits(model, mesh=None, x=ids):
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).logits)
        x = parallel.shard_batch({"ids": x}, mesh)["ids"] if mesh else jnp.asarray(x)
        return np.asarray(forward(state, x))

    def flat(model):
        return {".".join(map(str, p)): v.get_value()
                for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    # ---- mesh construction
    m = parallel.mesh(data=2, fsdp=-1)
    assert dict(m.shape) == {"data": 2, "fsdp": 4, "model": 1}
    assert all(t == AxisType.Auto for t in m.axis_types)
    for kwargs, msg in [
        (dict(data=3, fsdp=-1), "multiple of 3"),
        (dict(data=-1, fsdp=-1), "at most one"),
        (dict(data=2, fsdp=2), "covers 4 devices, but there are 8"),
        (dict(data=0), "positive"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parallel.mesh(**kwargs)
    assert dict(parallel.mesh(data=2, fsdp=2, devices=jax.devices()[:4]).shape)["fsdp"] == 2

    # ---- shard_batch: rows spread over data x fsdp, values intact
    b = parallel.shard_batch({"ids": ids, "w": np.float32(3.0)}, m)
    np.testing.assert_array_equal(np.asarray(b["ids"]), ids)
    assert b["ids"].sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in b["ids"].addressable_shards} == {(1, 9)}
    assert float(b["w"]) == 3.0
    with pytest.raises(ValueError, match="6 rows"):
        parallel.shard_batch({"ids": ids[:6]}, m)

    # ---- loading onto meshes gives the one-device model
    # One-device reference, one row at a time: XLA:CPU picks matmul kernels by shape, so a
    # batch of 8 and 8 batches of 1 already differ in the last bits on a single device. Every
    # mesh below holds one row per device, so this is the like-for-like comparison.
    ref_model = checkpoints.load_pretrained(hf_dir)
    ref_params = flat(ref_model)
    ref = np.concatenate([logits(ref_model, x=ids[i : i + 1]) for i in range(len(ids))])
    # FSDP lets the compiler split some contractions into per-device partial sums that are
    # added in another order: allow a few float32 ulps of the largest logit, nothing more.
    ulps = 8 * np.finfo(np.float32).eps * np.abs(ref).max()
    meshes = {}
    for data, fsdp in [(8, 1), (2, 4), (1, 8)]:
        mesh = parallel.mesh(data=data, fsdp=fsdp)
        meshes[data, fsdp] = mesh
        model = checkpoints.load_pretrained(hf_dir, mesh=mesh)
        params = flat(model)
        for name, x in params.items():
            assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh, name
            np.testing.assert_array_equal(np.asarray(x), np.asarray(ref_params[name]), err_msg=name)
        emb = params["embed_tokens.embedding"]  # [128, 64]: split along the vocabulary
        assert {s.data.shape for s in emb.addressable_shards} == {(128 // fsdp, 64)}, emb.sharding
        down = params["layers.0.mlp.down_proj.kernel"]  # [96, 64]
        want = (96 // fsdp, 64) if 96 % fsdp == 0 else (96, 64 // fsdp)
        assert {s.data.shape for s in down.addressable_shards} == {want}, down.sharding
        out = logits(model, mesh)
        print("mesh", (data, fsdp), "max |diff|", float(np.abs(out - ref).max()), "ulps", ulps)
        if fsdp == 1:  # pure data parallelism: the very same per-device program
            np.testing.assert_array_equal(out, ref, err_msg=str((data, fsdp)))
        else:
            np.testing.assert_allclose(out, ref, atol=ulps, rtol=0, err_msg=str((data, fsdp)))

    # ---- orbax: save from one mesh, restore onto another
    src = checkpoints.load_pretrained(hf_dir, mesh=meshes[1, 8])
    state = {"params": nnx.state(src, nnx.Param), "step": jnp.int32(4)}
    with checkpoints.TrainCheckpointer(work + "/ckpt") as ckpt:
        ckpt.save(4, state)
        restored = ckpt.restore(abstract_state=checkpoints.abstract_target(state, meshes[2, 4]))
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(restored),
                                 jax.tree_util.tree_leaves_with_path(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding.mesh == meshes[2, 4], path
    emb = restored["params"]["embed_tokens"]["embedding"][...]
    assert {s.data.shape for s in emb.addressable_shards} == {(32, 64)}

    checkpoints.save_model_orbax(src, work + "/model")
    back = checkpoints.load_model_orbax(work + "/model", mesh=meshes[8, 1])
    assert all(x.sharding.mesh == meshes[8, 1] for x in flat(back).values())
    np.testing.assert_array_equal(logits(back, meshes[8, 1]), ref)
    print("OK")
    """
)


def test_sharded_loading_on_8_devices(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "work").mkdir()
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "hf"), str(tmp_path / "work")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout[-3000:] + run.stderr[-5000:]
    print(run.stdout)
