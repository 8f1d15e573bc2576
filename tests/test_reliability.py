"""Never lose or mix a result: one writer per output, crash-safe swaps, resume that checks
what it resumes, bfloat16 runs that train, and runs that change nothing said out loud."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_cli_unlearn import FORGET_ROWS, args, build_tokenizer, save_tiny_llama, write_jsonl

from jaxunlearn import _io, cli


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    from test_cli_unlearn import RETAIN_ROWS

    return {
        "root": root,
        "model": str(save_tiny_llama(root / "model", build_tokenizer())),
        "forget": write_jsonl(root / "forget.jsonl", FORGET_ROWS),
        "retain": write_jsonl(root / "retain.jsonl", RETAIN_ROWS),
    }


def safetensors_bytes(directory):
    return (Path(directory) / "model.safetensors").read_bytes()


# ----------------------------------------------------------------------------- one writer


def test_a_second_writer_of_the_same_out_is_refused(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    with _io.exclusive_lock(out, "--out directory"):  # a run in progress holds the lock
        assert cli.main(args(workspace, out, "--set", "lr=1e-2")) == 2
    err = capsys.readouterr().err
    assert f"pid {os.getpid()}" in err and "is writing the --out directory" in err
    assert not out.exists() or not (out / "metrics.jsonl").exists()  # it wrote nothing
    assert cli.main(args(workspace, out, "--set", "lr=1e-2")) == 0  # the lock is released


def test_the_lock_of_a_killed_process_does_not_block(tmp_path):
    target = tmp_path / "out"
    code = f"from jaxunlearn import _io; import time\nwith _io.exclusive_lock({str(target)!r}):\n"
    code += "    print('held', flush=True); time.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(_io.BusyError, match=f"pid {proc.pid}"):
        with _io.exclusive_lock(target):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with _io.exclusive_lock(target):  # the kernel dropped the dead holder's lock
        pass


# ----------------------------------------------------------------------------- atomic saves


def make_dir(path, text):
    path.mkdir()
    (path / "model.safetensors").write_text(text)
    return path


def test_swap_leaves_the_new_directory_and_no_leftovers(tmp_path):
    dst = make_dir(tmp_path / "model", "old")
    ready = make_dir(_io.staging_path(dst, "ready", "abc"), "new")
    _io.swap_into_place(ready, dst)
    assert (dst / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_kill_between_the_two_renames_is_repaired_by_the_next_start(tmp_path, monkeypatch):
    # Without an atomic exchange the old directory is moved aside first; a crash right then
    # leaves no `model` at all, only hidden copies.
    dst = make_dir(tmp_path / "model", "old")
    ready = make_dir(_io.staging_path(dst, "ready", "abc"), "new")
    monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    renames = []

    def crash_on_second(src, target):
        renames.append((src, target))
        if len(renames) == 2:
            raise KeyboardInterrupt("killed between the renames")
        os.replace(src, target)

    monkeypatch.setattr(_io.os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _io.swap_into_place(ready, dst)
    monkeypatch.undo()
    assert not dst.exists()
    # The leftovers belong to this (live) process; as seen from a later run, it is dead.
    monkeypatch.setattr(_io, "_alive", lambda pid: False)
    said = _io.recover_interrupted_save(dst)
    assert "restored" in said
    assert (dst / "model.safetensors").read_text() == "new"  # the complete new version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # leftovers cleaned


def test_partial_copies_of_dead_saves_are_cleaned_and_live_ones_kept(tmp_path, monkeypatch):
    dst = make_dir(tmp_path / "model", "current")
    dead = make_dir(tmp_path / ".model.tmp-999999-aaaa", "partial")
    live = make_dir(tmp_path / f".model.tmp-{os.getpid()}-bbbb", "in progress")
    assert _io.recover_interrupted_save(dst) is None
    assert not dead.exists() and live.exists()
    assert (dst / "model.safetensors").read_text() == "current"


def test_save_pretrained_keeps_a_complete_model_when_the_swap_is_atomic(workspace, tmp_path):
    from jaxunlearn.checkpoints import load_pretrained, save_pretrained

    if not _io._exchange(tmp_path, tmp_path):  # exchanging a path with itself is a no-op
        pytest.skip("this filesystem has no atomic exchange")
    model = load_pretrained(workspace["model"])
    out = tmp_path / "saved"
    save_pretrained(model, out)
    save_pretrained(model, out, overwrite=True)
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


# ----------------------------------------------------------------------------- resume


def test_resume_with_another_setting_names_the_difference(workspace, tmp_path, capsys):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    base = ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "1"]
    assert cli.main(args(workspace, out, *base, "--set", "lr=1e-2", steps="1")) == 0
    capsys.readouterr()
    # the same run continued to more steps: allowed, and said
    assert cli.main(args(workspace, out, *base, "--set", "lr=1e-2", steps="2")) == 0
    assert "resuming from step 1" in capsys.readouterr().err
    # another learning rate into the same --out: refused, naming what differs
    assert cli.main(args(workspace, out, *base, "--set", "lr=5e-3", steps="3")) == 2
    assert "differs in hyperparameters" in capsys.readouterr().err
    # ... and from the same checkpoints into a new --out: the checkpoint says what differs
    other = tmp_path / "out2"
    assert cli.main(args(workspace, other, *base, "--set", "lr=5e-3", steps="3")) == 2
    err = capsys.readouterr().err
    assert "hyperparameters.learning_rate: checkpoint 0.01, this run 0.005" in err
    assert "new checkpoint_dir" in err


def test_resume_with_another_forget_file_is_refused(workspace, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    base = ["--checkpoint-dir", str(ckpt), "--set", "lr=1e-2"]
    assert cli.main(args(workspace, tmp_path / "a", *base, steps="1")) == 0
    other = write_jsonl(tmp_path / "other.jsonl", FORGET_ROWS[1:])
    ws = {**workspace, "forget": other}
    assert cli.main(args(ws, tmp_path / "b", *base, steps="2")) == 2
    err = capsys.readouterr().err
    assert "belongs to another run" in err and "forget_file" in err and "data" in err


def test_out_equal_to_model_is_refused(workspace, tmp_path, capsys):
    argv = args(workspace, workspace["model"], "--overwrite")
    assert cli.main(argv) == 2
    assert "is the --model directory" in capsys.readouterr().err


def test_a_kill_mid_run_then_the_same_command_is_bit_identical(workspace, tmp_path):
    """SIGKILL during a CLI run; the identical command resumes and ends where an
    uninterrupted run ends, to the bit."""
    steps = "6"
    clean = tmp_path / "clean"
    assert cli.main(args(workspace, clean, "--set", "lr=1e-2", steps=steps)) == 0

    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    argv = args(workspace, out, "--set", "lr=1e-2", "--checkpoint-dir", str(ckpt),
                "--checkpoint-every", "1", steps=steps)  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "jaxunlearn.cli", *argv], env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in ckpt.glob("[0-9]*") if p.name.isdigit() and int(p.name) >= 2]
        if done:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists()  # killed before the final save

    assert cli.main(argv) == 0  # the identical command: no --overwrite needed
    assert safetensors_bytes(out) == safetensors_bytes(clean)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(int(steps)))


# ----------------------------------------------------------------------------- precision


def test_a_bfloat16_run_trains(workspace, tmp_path):
    out = tmp_path / "bf16"
    argv = args(workspace, out, "--dtype", "bfloat16", "--set", "lr=5e-2", method="graddiff")
    assert cli.main(argv) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] is not None and np.isfinite(r["loss"]) for r in lines)
    assert safetensors_bytes(out) != safetensors_bytes(workspace["model"])


def test_recipe_optimizer_hyperparameters_stay_float32_for_bfloat16_params():
    import jax.numpy as jnp

    from jaxunlearn import recipes

    tx = recipes.recipe("npo").tx
    params = {"w": jnp.ones((4,), jnp.bfloat16)}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.full((4,), 0.5, jnp.bfloat16)}, state, params)
    assert np.all(np.isfinite(np.asarray(updates["w"], np.float32)))
    hyper = state[1].hyperparams
    assert all(v.dtype == jnp.float32 for v in hyper.values())
    assert float(hyper["b2"]) != 1.0  # bfloat16(0.999) == 1.0 made Adam divide by zero


# ----------------------------------------------------------------------------- no-op runs


def test_ssd_that_selects_nothing_fails_and_names_alpha(workspace, tmp_path, capsys):
    out = tmp_path / "ssd"
    argv = args(workspace, out, "--set", "alpha=1e9", method="ssd", steps="1")
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "changed no parameter" in err and "alpha" in err
    assert not (out / "model.safetensors").exists()


def test_rmu_default_layers_fail_cleanly_on_a_small_model(workspace, tmp_path, capsys):
    assert cli.main(args(workspace, tmp_path / "rmu", method="rmu")) == 2
    err = capsys.readouterr().err
    assert "do not exist in this 2-layer model" in err and "--set layer=" in err
    assert "Traceback" not in err


def test_lr_is_short_for_learning_rate():
    from jaxunlearn import recipes

    assert recipes.parse_overrides("npo", ["lr=2e-5"]) == {"learning_rate": 2e-5}
