"""Two processes x 4 CPU devices (jax.distributed on 127.0.0.1) unlearn like one process x 8.

Each of the two processes runs `train.unlearn` (gradient difference, AdamW, 3 steps) with the
model FSDP-sharded over all 8 devices, reading only its half of every batch
(`distributed.ProcessLocalSampler` + `distributed.place_process_batch`) and writing an orbax
checkpoint together with the other process. Then one process with 8 devices runs the same
unlearning from the global batches and must get the same parameters; it checks that each
process's rows were exactly its share of the global batch, in the (seed, step) order, and
restores the two-process checkpoint (through `unlearn`'s resume) to the same parameters.
"""

import os

import _multidevice

COMMON = """
    import optax
    from jaxunlearn import objectives, parallel, train
    from jaxunlearn.data import ForgetRetainSampler

    STEPS = 3

    def setup():
        sampler = ForgetRetainSampler(
            examples(16, 1), examples(24, 2), batch_size=8, seed=3, buckets=(16, 32)
        )
        objective = objectives.forget_retain(objectives.grad_ascent(), objectives.nll())
        return tiny_model(), sampler, objective, optax.adamw(1e-3, weight_decay=0.01)
"""

WORKER = """
    import sys
    from jax.experimental import multihost_utils
    from jaxunlearn import distributed

    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid
    )
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    model, sampler, objective, tx = setup()
    mesh = parallel.mesh(data=1, fsdp=8)
    assert distributed.process_rows(mesh, 8) == slice(4 * pid, 4 * pid + 4)
    read = {}  # part -> {step: this process's rows}

    class Recorded(distributed.ProcessLocalSampler):
        def batch_at(self, step):
            batch = super().batch_at(step)
            for name, part in batch.items():
                read.setdefault(name, {})[step] = np.asarray(part["input_ids"])
            return batch

    # unlearn sees process_local and places each batch with distributed.place_process_batch.
    local = Recorded(sampler, mesh)
    result = train.unlearn(
        model, objective, tx, local, steps=STEPS, mesh=mesh, progress=False,
        checkpoint_dir=f"{out}/ckpt",
    )
    params = nnx.state(result.model, nnx.Param)
    kernel = result.model.layers[0].mlp.up_proj.kernel.get_value()
    assert not kernel.is_fully_addressable and len(kernel.addressable_shards) == 4
    flat = {
        ".".join(map(str, p)): np.asarray(multihost_utils.process_allgather(v.get_value(), tiled=True))
        for p, v in nnx.to_flat_state(params)
    }
    np.savez(
        f"{out}/rows{pid}.npz",
        **{k: np.stack([v[s] for s in sorted(v)]) for k, v in read.items()},
    )
    if pid == 0:
        np.savez(f"{out}/params.npz", **flat)
        np.savez(f"{out}/losses.npz", loss=np.asarray([m["loss"] for m in result.metrics]))
    print("worker done", pid)
"""

CHECK = """
    import os, shutil, sys, time

    out = sys.argv[1]
    model, sampler, objective, tx = setup()
    mesh = parallel.mesh(data=1, fsdp=8)
    result = train.unlearn(model, objective, tx, sampler, steps=STEPS, mesh=mesh, progress=False)
    expected = flat_params(result.model)
    # Runs alongside the two workers; wait for their results.
    deadline = time.time() + 200
    while not os.path.exists(f"{out}/done") and time.time() < deadline:
        time.sleep(0.2)
    assert os.path.exists(f"{out}/done"), "the workers did not finish"
    two = dict(np.load(f"{out}/params.npz"))
    err = rel_err(two, expected)
    assert err <= 1e-5, err
    np.testing.assert_allclose(
        np.load(f"{out}/losses.npz")["loss"],
        [m["loss"] for m in result.metrics],
        rtol=1e-5,
        atol=1e-5,  # GA + NLL: a difference of two O(4) terms, so compare absolutely too
    )
    # Each process read exactly its half of each global batch, step by step.
    for pid in (0, 1):
        rows = np.load(f"{out}/rows{pid}.npz")
        for part in ("forget", "retain"):
            assert len(rows[part]) >= STEPS, (part, len(rows[part]))
            for step in range(STEPS):
                full = sampler.batch_at(step)[part]["input_ids"]
                np.testing.assert_array_equal(rows[part][step], full[4 * pid : 4 * pid + 4])
    # The checkpoint the two processes wrote, restored by this one (a resume at its end).
    shutil.copytree(f"{out}/ckpt", f"{out}/ckpt_one")
    restored = train.unlearn(
        model, objective, tx, sampler, steps=STEPS, mesh=mesh, progress=False,
        checkpoint_dir=f"{out}/ckpt_one",
    )
    assert restored.start_step == STEPS, restored.start_step
    assert rel_err(flat_params(restored.model), two) == 0.0
    print("check done", err)
"""


def test_two_processes_unlearn_like_one(tmp_path):
    port = str(_multidevice.free_port())
    worker = _multidevice.script(4, COMMON + WORKER)
    procs = [_multidevice.start(worker, str(i), port, str(tmp_path)) for i in (0, 1)]
    # The one-process run starts at once and waits for the workers' files before comparing.
    check = _multidevice.start(_multidevice.script(8, COMMON + CHECK), str(tmp_path))
    outputs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=240)
            outputs.append((p.returncode, stdout, stderr))
        if all(rc == 0 for rc, _, _ in outputs):
            (tmp_path / "done").touch()
            stdout, stderr = check.communicate(timeout=240)
            outputs.append((check.returncode, stdout, stderr))
    finally:
        for p in [*procs, check]:
            if p.poll() is None:
                p.kill()
    for rc, stdout, stderr in outputs:
        assert rc == 0, f"rc={rc}\n{stdout[-3000:]}\n{stderr[-5000:]}"
    assert os.path.exists(tmp_path / "ckpt")
    assert "check done" in outputs[-1][1]
