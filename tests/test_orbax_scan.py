"""Orbax model checkpoints and stacked (scan_layers) models: stored per layer, loaded either way.

A tiny random llama made by transformers is loaded with stacked layers, saved with
`save_model_orbax` and loaded back stacked and unstacked; a Hugging Face directory converted
to orbax loads with `scan_layers`. Logits are compared with transformers' own.
"""

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_checkpoints import _logits, _torch_logits, _torch_model

from jaxunlearn import checkpoints
from jaxunlearn.checkpoints import convert

ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    model = _torch_model("llama")
    path = tmp_path_factory.mktemp("llama_scan")
    model.save_pretrained(path)
    return path, _torch_logits(model), model.config.num_hidden_layers


def _stored_names(path):
    with ocp.StandardCheckpointer() as ckptr:
        return set(ckptr.metadata(path.absolute() / "params").item_metadata.tree)


def test_stacked_model_saves_per_layer_and_loads_either_way(hf_llama, tmp_path):
    src, torch_logits, layers = hf_llama
    stacked = checkpoints.load_pretrained(src, scan_layers=True)
    np.testing.assert_allclose(_logits(stacked), torch_logits, atol=ATOL)
    out = checkpoints.save_model_orbax(stacked, tmp_path / "m")

    names = _stored_names(out)
    assert {f"layers.{i}.attn.q_proj.kernel" for i in range(layers)} <= names
    assert not any(n.startswith("layers.attn") for n in names)  # no stacked tensor in the file
    unrolled = checkpoints.load_pretrained(src)
    assert names == set(checkpoints._model.flat_params(unrolled))  # the unstacked model's names

    for scan in (False, True):
        back = checkpoints.load_model_orbax(out, scan_layers=scan, remat="full")
        assert back.scan_layers is scan and back.remat == "full"
        np.testing.assert_allclose(_logits(back), torch_logits, atol=ATOL)
    q = back.layers.attn.q_proj.kernel.get_value()  # stacked again, bit for bit
    np.testing.assert_array_equal(
        np.asarray(q), np.asarray(stacked.layers.attn.q_proj.kernel.get_value())
    )


def test_converted_orbax_loads_with_scan_layers_and_back_to_hf(hf_llama, tmp_path):
    src, torch_logits, _ = hf_llama
    orb = convert.convert(src, tmp_path / "orbax", to="orbax")
    model = checkpoints.load_model_orbax(orb, scan_layers=True)
    np.testing.assert_allclose(_logits(model), torch_logits, atol=ATOL)
    # Round trip of the stacked model through orbax and convert back to a HF directory.
    checkpoints.save_model_orbax(model, tmp_path / "orbax2")
    hf = convert.convert(tmp_path / "orbax2", tmp_path / "hf", to="hf")
    assert json.loads((hf / "config.json").read_text())["num_hidden_layers"] == 2
    np.testing.assert_allclose(_logits(checkpoints.load_pretrained(hf)), torch_logits, atol=ATOL)
