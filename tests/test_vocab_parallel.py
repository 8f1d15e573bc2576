"""Vocabulary-parallel token log-probs (jaxunlearn.vocab_parallel) on 8 simulated devices.

Against `scores.token_scores` on one device (values and gradients), with the head split
over "model"; the compiled program must not gather the whole head onto a device.
"""

import _multidevice

BODY = """
    import re
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxunlearn import parallel, scores, vocab_parallel
    from jaxunlearn.models.outputs import Head

    rng = np.random.default_rng(0)
    B, T, D, V = 8, 12, 16, 256
    hidden = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((D, V)), jnp.float32)
    labels = rng.integers(0, V, (B, T)).astype(np.int32)
    labels[:, :4] = -100
    labels = jnp.asarray(labels)
    weights = jnp.asarray(rng.standard_normal((B, T - 1)), jnp.float32)

    def plain(h, k):
        return (scores.token_scores(Head(h, k), labels, chunk_size=24).logprob * weights).sum()

    expected = jax.value_and_grad(plain, argnums=(0, 1))(hidden, kernel)
    for fsdp, model in [(2, 4), (1, 8)]:
        mesh = parallel.mesh(data=-1, fsdp=fsdp, model=model)
        h = jax.device_put(hidden, NamedSharding(mesh, P(("data", "fsdp"))))
        k = jax.device_put(kernel, NamedSharding(mesh, P("fsdp", "model")))

        def sharded(h, k):
            lp = vocab_parallel.token_logprob(Head(h, k), labels, mesh, chunk_size=24)
            return (lp * weights).sum()

        f = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))
        got = f(h, k)
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
        for g, e in zip(got[1], expected[1]):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-5)
        hlo = f.lower(h, k).compile().as_text()
        gathered = re.findall(r"= f32\\[([0-9,]+)\\][^ ]* all-gather\\(", hlo)
        assert not any(s.endswith(str(V)) for s in gathered), gathered  # never [.., V]
        print("ok", fsdp, model)
    try:
        vocab_parallel.token_logprob(Head(hidden, kernel[:, :250]), labels, mesh)
    except ValueError as e:
        assert "'model' of size 8 does not divide the vocabulary (250)" in str(e), e
    else:
        raise AssertionError("no error for V=250 on 8-way model axis")
"""


def test_vocab_parallel_logprob_matches_token_scores():
    proc = _multidevice.run(_multidevice.script(8, BODY), timeout=300)
    assert proc.returncode == 0, _multidevice.failure(proc)
    assert proc.stdout.count("ok ") == 2, proc.stdout
