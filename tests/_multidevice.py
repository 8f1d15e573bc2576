"""Helpers for tests that need several (simulated CPU) devices or processes.

`jax_num_cpu_devices` must be set before JAX initialises, so such tests run their body as a
separate Python process. `SETUP` is the shared beginning of those scripts: a tiny Llama,
random tokenised examples and a flat view of a model's parameters.
"""

import os
import socket
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETUP = textwrap.dedent(
    """
    import numpy as np
    from flax import nnx
    from jaxunlearn.models import ModelConfig, build_model

    def tiny_model(heads=4, kv_heads=2, layers=1):
        cfg = ModelConfig.from_hf_dict({
            "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "max_position_embeddings": 64,
        })
        return build_model(cfg, rngs=nnx.Rngs(0))

    def examples(n, seed):
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            ids = rng.integers(3, 64, size=int(rng.integers(5, 17))).astype(np.int32)
            labels = ids.copy()
            labels[: len(ids) // 2] = -100
            out.append({"input_ids": ids, "labels": labels})
        return out

    def flat_params(model):
        return {
            ".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        }

    def rel_err(got, expected):
        return max(
            float(np.linalg.norm(got[n] - v) / np.linalg.norm(v)) for n, v in expected.items()
        )
    """
)


def env() -> dict:
    """The environment for a child Python: this checkout first on the path, no XLA_FLAGS."""
    out = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out.pop("XLA_FLAGS", None)
    return out


def script(devices: int, body: str) -> str:
    """A script that sets `devices` CPU devices, then runs `SETUP` and `body`."""
    head = f'import jax\njax.config.update("jax_num_cpu_devices", {devices})\n'
    return head + SETUP + textwrap.dedent(body)


def run(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh Python and returns the finished process (output captured)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True, text=True, env=env(), timeout=timeout, cwd=REPO,
    )  # fmt: skip


def start(code: str, *args: str) -> subprocess.Popen:
    """Starts `code` in a fresh Python without waiting (output captured)."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO,
    )  # fmt: skip


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def failure(proc) -> str:
    """The tail of a finished process's output, for an assertion message."""
    return f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
