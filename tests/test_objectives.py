"""Tests for jaxunlearn.objectives against open-unlearning's formulas written in torch.

A toy "model" (embedding lookup, one residual tanh layer, unembedding) returns a
CausalLMOutput with a Head, so the objectives score chunked logits; the reference values
are computed by torch from the same logits, following open-unlearning's code
(src/trainer/utils.py and src/trainer/unlearn/*.py) and FLAT's dataloader.py.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from jaxunlearn import objectives as ob
from jaxunlearn.models.outputs import CausalLMOutput, Head

B, T, D, V = 3, 9, 16, 113  # V >= 100 for UNDIAL's -100 -> V - 100 quirk
CHUNK = 16  # does not divide V


def make_params(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "embed": rng.normal(size=(V, D)).astype(np.float32),
        "mix": (rng.normal(size=(D, D)) / np.sqrt(D)).astype(np.float32),
        "kernel": (scale * 2 * rng.normal(size=(D, V)) / np.sqrt(D)).astype(np.float32),
    }


def make_forward(params):
    """Toy forward; hidden_states[0] = embeddings, [1] = final hidden."""
    params = jax.tree.map(jnp.asarray, params)

    def forward(
        input_ids, attention_mask=None, *, position_ids=None, hidden_layers=(), return_logits=True
    ):
        assert not return_logits, "objectives must score the Head, not request logits"
        h0 = params["embed"][input_ids]
        h1 = jnp.tanh(h0 @ params["mix"]) + h0
        states = {i: h for i, h in ((0, h0), (1, h1)) if i in hidden_layers}
        return CausalLMOutput(None, Head(h1, params["kernel"]), states)

    return forward


def np_hidden(params, ids):
    h0 = params["embed"].astype(np.float64)[ids]
    return h0, np.tanh(h0 @ params["mix"].astype(np.float64)) + h0


def t_logits(params, batch, kernel=None):
    """torch float64 logits [B, T, V] of the toy model; `kernel` may be a grad leaf."""
    _, h1 = np_hidden(params, np.asarray(batch["input_ids"]))
    w = torch.from_numpy(params["kernel"]).double() if kernel is None else kernel
    return torch.from_numpy(h1) @ w


def leaf(params):
    return torch.from_numpy(params["kernel"]).double().requires_grad_(True)


def make_batch(seed, prompt_len=3, lengths=(9, 7, 5)):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, V, size=(B, T)).astype(np.int32)
    pos = np.arange(T)[None, :]
    real = pos < np.array(lengths)[:, None]
    ids = np.where(real, ids, 0)
    labels = np.where(real & (pos >= prompt_len), ids, -100).astype(np.int32)
    return {"input_ids": ids, "attention_mask": real.astype(np.int32), "labels": labels}


THETA, REF = make_params(0), make_params(1, scale=0.8)
FORGET, RETAIN, ALTERNATE = make_batch(10), make_batch(11), make_batch(12, prompt_len=2)
UNLEARN = {"forget": FORGET, "retain": RETAIN, "alternate": ALTERNATE}


@functools.cache
def _compiled(objective, with_ref, with_grad):
    ref_forward = make_forward(REF) if with_ref else None

    def run(kernel, batch, state):
        kw = {} if state is None else {"state": state}
        fwd = make_forward({**THETA, "kernel": kernel})
        return objective(fwd, batch, ref_forward=ref_forward, **kw)

    return jax.jit(jax.value_and_grad(run, has_aux=True) if with_grad else run)


def evaluate(objective, batch, state=None, ref=True):
    """(loss, aux) of an objective (or term) with the toy model, under jax.jit (cached).

    ref=False calls it without a reference model.
    """
    return _compiled(objective, ref, False)(jnp.asarray(THETA["kernel"]), batch, state)


def kernel_grad(objective, batch):
    """(loss, aux, d loss / d kernel) of an objective with the toy model, under jax.jit."""
    (loss, aux), grad = _compiled(objective, True, True)(jnp.asarray(THETA["kernel"]), batch, None)
    return loss, aux, grad


# One compiled reference scorer shared by the tests (all batches have the same shape).
ref_logprob = jax.jit(
    lambda batch: ob.reference_logprob(make_forward(REF), batch, chunk_size=CHUNK)
)


# ---- open-unlearning formulas, in torch -------------------------------------------------


def t_batch_nll(logits, labels):
    """compute_batch_nll: per-sequence summed CE over shifted positions."""
    y = torch.from_numpy(np.asarray(labels)).long()[..., 1:]
    ce = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    return ce(logits[..., :-1, :].transpose(-1, -2), y).sum(-1)


def t_hf_loss(logits, labels):
    """Hugging Face outputs.loss: token-weighted mean CE with ignore_index -100."""
    y = torch.from_numpy(np.asarray(labels)).long()[..., 1:].reshape(-1)
    return torch.nn.CrossEntropyLoss(ignore_index=-100)(logits[..., :-1, :].reshape(-1, V), y)


def t_kl(ref_logits, logits):
    """compute_kl_divergence: kl_div(batchmean, log_target) on (B·T, V) rows."""
    lr = F.log_softmax(ref_logits, -1).view(-1, V)
    lt = F.log_softmax(logits, -1).view(-1, V)
    return F.kl_div(lt, lr, reduction="batchmean", log_target=True)


def t_token_ce(logits, labels):
    y = torch.from_numpy(np.asarray(labels)).long()[..., 1:].reshape(-1)
    lm = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(
        logits[..., :-1, :].reshape(-1, V), y
    )
    return lm, y


# ---- likelihood terms -------------------------------------------------------------------


def test_nll_and_grad_ascent_match_hf_loss():
    want = t_hf_loss(t_logits(THETA, FORGET), FORGET["labels"]).item()
    nll, _ = evaluate(ob.nll(chunk_size=CHUNK), FORGET)
    ga, aux = evaluate(ob.grad_ascent(chunk_size=CHUNK), FORGET)
    assert float(nll) == pytest.approx(want, rel=1e-5)
    assert float(ga) == pytest.approx(-want, rel=1e-5)
    assert float(aux["nll"]) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("retain_loss", ["nll", "kl"])
def test_grad_diff_value_gradient_and_split(retain_loss):
    objective = ob.grad_diff(gamma=0.7, alpha=1.3, retain_loss=retain_loss, chunk_size=CHUNK)
    w = leaf(THETA)
    forget = -t_hf_loss(t_logits(THETA, FORGET, w), FORGET["labels"])
    if retain_loss == "nll":
        retain = t_hf_loss(t_logits(THETA, RETAIN, w), RETAIN["labels"])
    else:
        retain = t_kl(t_logits(REF, RETAIN), t_logits(THETA, RETAIN, w))
    want = 0.7 * forget + 1.3 * retain
    want.backward()

    value, aux, grad = kernel_grad(objective, UNLEARN)
    assert float(value) == pytest.approx(want.item(), rel=1e-5)
    np.testing.assert_allclose(grad, w.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert float(aux["forget_loss"]) == pytest.approx(forget.item(), rel=1e-5)
    assert float(aux["retain_loss"]) == pytest.approx(retain.item(), rel=1e-5)

    if retain_loss == "kl":
        return
    # The forget/retain split reproduces the combination, values and gradients.
    lf, _, g_f = kernel_grad(objective.forget_loss, UNLEARN)
    lr, _, g_r = kernel_grad(objective.retain_loss, UNLEARN)
    assert float(lf) == pytest.approx(float(aux["forget_loss"]), rel=1e-6)
    assert float(lr) == pytest.approx(float(aux["retain_loss"]), rel=1e-6)
    gamma, alpha = objective.weights(objective.init_state())
    np.testing.assert_allclose(gamma * g_f + alpha * g_r, grad, rtol=1e-5, atol=1e-6)


def test_kl_retain_covers_padding_positions():
    term = ob.kl_retain(chunk_size=CHUNK)
    got, _ = evaluate(term, RETAIN)
    want = t_kl(t_logits(REF, RETAIN), t_logits(THETA, RETAIN)).item()
    assert float(got) == pytest.approx(want, rel=1e-5)
    # Changing the ids at padded positions changes the loss: padding counts, as in OU.
    moved = {**RETAIN, "input_ids": np.where(RETAIN["attention_mask"] == 1, RETAIN["input_ids"], 5)}
    assert abs(float(evaluate(term, moved)[0]) - float(got)) > 1e-4


@pytest.mark.parametrize("beta", [0.5])
def test_wga_matches_open_unlearning(beta):
    w = leaf(THETA)
    lm, y = t_token_ce(t_logits(THETA, FORGET, w), FORGET["labels"])
    weight = ((-lm).exp().detach()) ** beta
    want = -(weight * lm)[y != -100].mean()
    want.backward()
    value, _, grad = kernel_grad(
        ob.forget_retain(ob.wga(beta, chunk_size=CHUNK)), {"forget": FORGET}
    )
    assert float(value) == pytest.approx(want.item(), rel=1e-5)
    np.testing.assert_allclose(grad, w.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_satimp_matches_open_unlearning():
    w = leaf(THETA)
    lm, y = t_token_ce(t_logits(THETA, FORGET, w), FORGET["labels"])
    p = (-lm).exp().detach()
    want = -((p**5.0) * (1 - p) ** 1.0 * lm)[y != -100].mean()
    want.backward()

    value, _, grad = kernel_grad(ob.satimp(chunk_size=CHUNK), FORGET)
    assert float(value) == pytest.approx(want.item(), rel=1e-5)
    np.testing.assert_allclose(grad, w.grad.numpy(), rtol=1e-4, atol=1e-8)


# ---- preference terms -------------------------------------------------------------------


def test_reference_logprob_is_the_summed_reference_log_prob():
    got = ref_logprob(FORGET)
    want = -t_batch_nll(t_logits(REF, FORGET), FORGET["labels"])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)


@pytest.mark.parametrize("beta", [0.1])
def test_npo_matches_compute_dpo_loss(beta):
    w = leaf(THETA)
    lose_log_ratio = -(
        t_batch_nll(t_logits(THETA, FORGET, w), FORGET["labels"])
        - t_batch_nll(t_logits(REF, FORGET), FORGET["labels"])
    )
    want = -2 / beta * F.logsigmoid(beta * (0.0 - lose_log_ratio)).mean()
    want.backward()

    term = ob.npo(beta, chunk_size=CHUNK)
    value, _, grad = kernel_grad(term, FORGET)  # reference scored with ref_forward
    assert float(value) == pytest.approx(want.item(), rel=1e-5)
    np.testing.assert_allclose(grad, w.grad.numpy(), rtol=1e-4, atol=1e-7)

    # Precomputed reference log-probs give the same loss with no reference model at all.
    pre = {**FORGET, "ref_logprob": ref_logprob(FORGET)}
    loss, aux = evaluate(term, pre, ref=False)
    assert float(loss) == pytest.approx(want.item(), rel=1e-5)
    assert float(aux["log_ratio"]) == pytest.approx(lose_log_ratio.mean().item(), rel=1e-5)


def test_simnpo_matches_open_unlearning():
    # prompt_len=0: the first label is scored, where OU's unshifted count adds one token.
    forget = make_batch(13, prompt_len=0)
    beta, delta = 4.5, 0.3
    loss_mask = torch.from_numpy(forget["labels"] != -100)
    nll = t_batch_nll(t_logits(THETA, forget), forget["labels"])
    forget_loss = nll / loss_mask.sum(-1) - delta
    want = -F.logsigmoid(beta * forget_loss).mean() * 2 / beta
    got, _ = evaluate(ob.simnpo(beta, delta, chunk_size=CHUNK), forget)
    assert float(got) == pytest.approx(want.item(), rel=1e-5)


def test_dpo_matches_compute_dpo_loss():
    beta = 0.1
    w = leaf(THETA)

    def log_ratio(batch):
        cur = t_batch_nll(t_logits(THETA, batch, w), batch["labels"])
        ref = t_batch_nll(t_logits(REF, batch), batch["labels"])
        return -(cur - ref)

    want = -2 / beta * F.logsigmoid(beta * (log_ratio(ALTERNATE) - log_ratio(FORGET))).mean()
    want.backward()
    objective = ob.forget_retain(ob.idk_dpo(beta, chunk_size=CHUNK), ob.nll(), alpha=0.0)
    value, _, grad = kernel_grad(objective, UNLEARN)
    assert float(value) == pytest.approx(want.item(), rel=1e-5)
    np.testing.assert_allclose(grad, w.grad.numpy(), rtol=1e-4, atol=1e-7)

    pre = {
        "forget": {**FORGET, "ref_logprob": ref_logprob(FORGET)},
        "alternate": {**ALTERNATE, "ref_logprob": ref_logprob(ALTERNATE)},
    }
    loss, _ = evaluate(ob.dpo(beta, chunk_size=CHUNK), pre, ref=False)
    assert float(loss) == pytest.approx(want.item(), rel=1e-5)


# ---- soft-target terms ------------------------------------------------------------------


def t_undial(logits, ref_logits, labels, beta, masked):
    """compute_undial_loss (masked=False); masked=True averages over scored positions only."""
    shift_labels = torch.from_numpy(np.asarray(labels)).long()[..., 1:]
    shift_logits, shift_ref = logits[..., :-1, :], ref_logits[..., :-1, :]
    mask = torch.zeros_like(shift_ref)
    batch_idx = torch.arange(mask.shape[0]).view(-1, 1, 1)
    seq_idx = torch.arange(mask.shape[1]).view(1, -1, 1)
    mask[batch_idx, seq_idx, shift_labels.unsqueeze(-1)] = 1.0  # -100 -> slot V - 100
    soft_label = F.softmax(shift_ref - mask * beta, dim=-1)
    loss = torch.nn.CrossEntropyLoss(reduction="none")(
        shift_logits.reshape(-1, V), soft_label.reshape(-1, V)
    )
    if masked:
        return loss[shift_labels.reshape(-1) != -100].mean()
    return loss.mean()


@pytest.mark.parametrize("quirk", [False, True])
def test_undial(quirk):
    w = leaf(THETA)
    want = t_undial(
        t_logits(THETA, FORGET, w), t_logits(REF, FORGET), FORGET["labels"], 10.0, not quirk
    )
    want.backward()
    other = t_undial(t_logits(THETA, FORGET), t_logits(REF, FORGET), FORGET["labels"], 10.0, quirk)
    assert abs(want.item() - other.item()) > 1e-3  # this batch tells the two modes apart
    term = ob.undial(10.0, ou_label_quirk=quirk, chunk_size=CHUNK)
    value, _, grad = kernel_grad(term, FORGET)
    assert float(value) == pytest.approx(want.item(), rel=1e-5)
    np.testing.assert_allclose(grad, w.grad.numpy(), rtol=1e-4, atol=1e-7)


def t_ceu(logits, labels, n):
    """compute_batch_ceu + cross_entropy_unlearning_loss from open-unlearning ceu.py."""
    labels = torch.from_numpy(np.asarray(labels)).long()
    valid_mask = labels != -100
    update_mask = (valid_mask.cumsum(dim=-1) <= n) & valid_mask
    labels = labels.masked_fill(update_mask, -100)
    shifted_labels, shifted_logits = labels[..., 1:], logits[..., :-1, :]
    valid = shifted_labels != -100
    valid_logits, valid_labels = shifted_logits[valid], shifted_labels[valid]
    target = valid_logits.detach().clone()
    target.scatter_(dim=-1, index=valid_labels.unsqueeze(-1), value=float("-inf"))
    return F.cross_entropy(input=valid_logits, target=F.softmax(target, dim=-1))


@pytest.mark.parametrize("n", [0, 1])
def test_ceu_matches_open_unlearning(n):
    w = leaf(THETA)
    want = t_ceu(t_logits(THETA, FORGET, w), FORGET["labels"], n)
    want.backward()
    value, _, grad = kernel_grad(ob.ceu(n, chunk_size=CHUNK), FORGET)
    assert float(value) == pytest.approx(want.item(), rel=1e-5)
    np.testing.assert_allclose(grad, w.grad.numpy(), rtol=1e-4, atol=1e-7)


# ---- FLAT -------------------------------------------------------------------------------


def t_flat(forget_logits, forget_labels, good_logits, good_labels, div):
    """FLAT's ProbLossStable + get_contrastive_loss (UCSC-REAL/FLAT dataloader.py)."""
    nll = torch.nn.NLLLoss(reduction="none", ignore_index=-100)

    def prob_sum(logits, labels):
        labels = torch.from_numpy(np.asarray(labels)).long()[:, 1:]
        per = [nll(F.softmax(logits[b, :-1], -1), labels[b]) for b in range(logits.shape[0])]
        return torch.stack(per).mean()

    if div == "kl":
        activation, conjugate = (lambda x: -x), (lambda x: -torch.exp(x - 1.0))
    elif div == "js":
        log2 = torch.log(torch.tensor(2.0, dtype=torch.float64))
        activation = lambda x: torch.log(1.0 + torch.exp(-x)) - log2
        conjugate = lambda x: -(x + torch.log(1.0 + torch.exp(-x))) + log2
    elif div == "pearson":
        activation, conjugate = (lambda x: -x), (lambda x: -(x * x / 4.0 + x))
    else:
        activation = conjugate = lambda x: -torch.tanh(x) / 2.0
    loss_regular = activation(-prob_sum(good_logits, good_labels))
    loss_peer = conjugate(-prob_sum(forget_logits, forget_labels))
    return loss_regular - loss_peer


@pytest.mark.parametrize("div", ["tv", "kl", "js", "pearson"])
def test_flat_matches_reference_code(div):
    w = leaf(THETA)
    want = t_flat(
        t_logits(THETA, FORGET, w), FORGET["labels"], t_logits(THETA, ALTERNATE, w),
        ALTERNATE["labels"], div,
    )  # fmt: skip
    want.backward()
    value, _, grad = kernel_grad(ob.forget_retain(ob.flat(div, chunk_size=CHUNK)), UNLEARN)
    assert float(value) == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(grad, w.grad.numpy(), rtol=1e-4, atol=1e-8)


# ---- PDU --------------------------------------------------------------------------------


def test_pdu_loss_and_dual_updates_follow_open_unlearning():
    eps, eta = 0.5, 0.8
    objective = ob.pdu(
        retain_loss_eps=eps, gamma=1.0, alpha=2.0, dual_step_size=eta, chunk_size=CHUNK
    )
    logits_f = t_logits(THETA, FORGET).reshape(-1, V)
    forget_loss = ((logits_f.max(-1)[0] - logits_f.mean(-1)) ** 2).mean().item()
    retain_loss = t_hf_loss(t_logits(THETA, RETAIN), RETAIN["labels"]).item()

    # open-unlearning PDU.final_loss_value, replayed in plain Python for three steps.
    preferences = [1.0, 2.0]
    state = objective.init_state()
    ref_forward = make_forward(REF)
    call = jax.jit(
        lambda batch, state: objective(
            make_forward(THETA), batch, ref_forward=ref_forward, state=state
        )
    )
    for _ in range(3):
        want = preferences[0] * forget_loss + preferences[1] * (retain_loss - eps)
        preferences[1] = max(0.0, preferences[1] + eta * (retain_loss - eps))
        loss, aux = call(UNLEARN, state)
        assert float(loss) == pytest.approx(want, rel=1e-5)
        assert float(aux["forget_loss"]) == pytest.approx(forget_loss, rel=1e-5)
        assert float(aux["retain_loss"]) == pytest.approx(retain_loss, rel=1e-5)
        state = objective.update_state(state, aux)
        assert float(state.multiplier) == pytest.approx(preferences[1], rel=1e-5)
    assert objective.weights(state)[1] is state.multiplier


def test_pdu_warmup_projection_and_modes():
    objective = ob.pdu(retain_loss_eps=1.0, alpha=0.5, dual_warmup=2)
    state = objective.init_state()
    for expected in (0.5, 0.5, 0.0, 0.0):  # two skipped, then max(0, 0.5 + (0.2 - 1)) = 0
        state = objective.update_state(state, {"retain_loss": jnp.float32(0.2)})
        assert float(state.multiplier) == pytest.approx(expected)
    assert int(state.count) == 4

    epoch = ob.pdu(retain_loss_eps=1.0, alpha=0.5, dual_update="epoch")
    state = epoch.init_state()
    assert epoch.update_state(state, {"retain_loss": jnp.float32(3.0)}) is state
    assert float(epoch.update_dual(state, jnp.float32(3.0)).multiplier) == pytest.approx(2.5)
    fixed = ob.pdu(retain_loss_eps=1.0, alpha=0.5, dual_update=None)
    assert fixed.update_state(fixed.init_state(), {"retain_loss": 9.0}).multiplier == 0.5


# ---- RMU --------------------------------------------------------------------------------


def t_activation_loss(activation1, activation2, mask):
    """RMU.compute_activation_loss from open-unlearning rmu.py."""
    squared_diff = F.mse_loss(activation1, activation2, reduction="none")
    expanded_mask = mask.unsqueeze(-1).expand_as(squared_diff)
    squared_diff_sum = (squared_diff * expanded_mask).mean(dim=2).sum(dim=(1))
    num_tokens = mask.sum(dim=-1, keepdim=True)
    return (squared_diff_sum / num_tokens).mean()


def np_activation_loss(h, target, labels):
    """The intended form: mean_i[ sum_t m_t mean_d (h - target)^2 / sum_t m_t ] (numpy)."""
    m = labels != -100
    per_token = ((h - target) ** 2).mean(-1)
    return np.mean([(per_token[i] * m[i]).sum() / m[i].sum() for i in range(len(h))])


@pytest.mark.parametrize("quirk", [False, True])
def test_rmu_matches_open_unlearning(quirk):
    control = ob.rmu_control_vector(3, D, 6.5)
    objective = ob.rmu(layer=1, steering_coeff=6.5, alpha=40.0, key=3, ou_broadcast_quirk=quirk)
    loss, aux = evaluate(objective, UNLEARN)

    _, h_f = np_hidden(THETA, FORGET["input_ids"])
    _, h_r = np_hidden(THETA, RETAIN["input_ids"])
    _, h_ref = np_hidden(REF, RETAIN["input_ids"])
    c = np.asarray(control, np.float64)
    f_mask = torch.from_numpy(FORGET["labels"] != -100)
    cv = torch.from_numpy(c).view(1, 1, D).expand(B, T, D)
    ou_forget = t_activation_loss(torch.from_numpy(h_f), cv, f_mask).item()
    if quirk:  # open-unlearning's code, [B] / [B, 1] broadcast included
        r_mask = torch.from_numpy(RETAIN["labels"] != -100)
        forget = ou_forget
        retain = t_activation_loss(torch.from_numpy(h_r), torch.from_numpy(h_ref), r_mask).item()
    else:
        forget = np_activation_loss(h_f, c, FORGET["labels"])
        retain = np_activation_loss(h_r, h_ref, RETAIN["labels"])
    # FORGET has 6, 4 and 2 scored tokens, so the two modes differ on it.
    assert abs(np_activation_loss(h_f, c, FORGET["labels"]) - ou_forget) > 1e-3
    assert float(aux["forget_loss"]) == pytest.approx(forget, rel=1e-5)
    assert float(aux["retain_loss"]) == pytest.approx(retain, rel=1e-5)
    assert float(loss) == pytest.approx(forget + 40.0 * retain, rel=1e-5)


def test_rmu_control_vector():
    control = ob.rmu_control_vector(3, D, 6.5)
    # Uniform [0, 1) direction (all positive), norm c, fixed by the key.
    assert float(jnp.linalg.norm(control)) == pytest.approx(6.5, rel=1e-6)
    assert bool((control > 0).all())
    np.testing.assert_array_equal(control, ob.rmu_control_vector(jax.random.key(3), D, 6.5))
    assert not np.allclose(control, ob.rmu_control_vector(4, D, 6.5))

    # A per-batch control vector overrides the drawn one.
    _, h_f = np_hidden(THETA, FORGET["input_ids"])
    own = np.full((D,), 0.25, np.float32)
    got, _ = evaluate(ob.rmu_forget(layer=1), {**FORGET, "control_vector": own})
    assert float(got) == pytest.approx(np_activation_loss(h_f, own, FORGET["labels"]), rel=1e-5)


def test_rmu_param_labels_freeze_everything_else():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.mlp = nnx.Dict(down_proj=nnx.Linear(4, 4, use_bias=False, rngs=rngs))
            self.attn = nnx.Linear(4, 4, use_bias=False, rngs=rngs)

    class Toy(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([Block(rngs) for _ in range(8)])

    _, params, _ = nnx.split(Toy(nnx.Rngs(0)), nnx.Param, ...)
    labels = ob.rmu_param_labels(params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(labels)[0]}
    trainable = sorted(k for k, v in flat.items() if v == "trainable")
    assert len(trainable) == 3 and all("down_proj" in k for k in trainable)
    assert all(any(f"[{i}]" in k for k in trainable) for i in (5, 6, 7))

    tx = optax.partition({"trainable": optax.sgd(1.0), "frozen": optax.set_to_zero()}, labels)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    moved = {jax.tree_util.keystr(p): float(jnp.abs(u).sum())
             for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]}  # fmt: skip
    assert sorted(k for k, v in moved.items() if v > 0) == trainable

    with pytest.raises(ValueError, match="no parameter matches"):
        ob.rmu_param_labels(params, module="mlp.gate_proj")


# ---- combinators, jit, errors ------------------------------------------------------------


def test_weighted_sum_adds_terms():
    term = ob.weighted_sum((0.5, ob.nll(chunk_size=CHUNK)), (2.0, ob.wga(1.0, chunk_size=CHUNK)))
    loss, aux = evaluate(term, FORGET)
    a = t_hf_loss(t_logits(THETA, FORGET), FORGET["labels"]).item()
    lm, y = t_token_ce(t_logits(THETA, FORGET), FORGET["labels"])
    b = -((-lm).exp() * lm)[y != -100].mean().item()
    assert float(loss) == pytest.approx(0.5 * float(a) + 2.0 * float(b), rel=1e-6)
    assert set(aux) == {"term0_loss", "term1_loss"}


# Every objective is already compiled with jax.jit by the formula tests above (`evaluate`
# and `kernel_grad` jit); these cover each calling pattern (reference model, paired batch,
# hidden states, explicit state) for retracing.
ALL_OBJECTIVES = {
    "grad_diff_kl": lambda: ob.grad_diff(retain_loss="kl", chunk_size=CHUNK),
    "dpo": lambda: ob.forget_retain(ob.dpo(chunk_size=CHUNK), ob.nll()),
    "pdu": lambda: ob.pdu(retain_loss_eps=0.1, chunk_size=CHUNK),
    "rmu": lambda: ob.rmu(layer=1),
}


@pytest.mark.parametrize("name", sorted(ALL_OBJECTIVES))
def test_every_objective_compiles_once_under_jit(name):
    """One compile serves new batch values and new state; gradients are finite."""
    objective = ALL_OBJECTIVES[name]()
    ref = make_forward(REF)
    traces = []

    def loss(kernel, batch, state):
        traces.append(1)
        fwd = make_forward({**THETA, "kernel": kernel})
        return objective(fwd, batch, ref_forward=ref, state=state)

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    kernel, state = jnp.asarray(THETA["kernel"]), objective.init_state()
    (value, aux), grad = step(kernel, jax.tree.map(jnp.asarray, UNLEARN), state)
    state = objective.update_state(state, aux)
    other = {k: make_batch(20 + i) for i, k in enumerate(UNLEARN)}
    (value2, _), grad2 = step(kernel, jax.tree.map(jnp.asarray, other), state)
    assert len(traces) == 1  # new batch values and new state: no retrace
    assert np.isfinite([float(value), float(value2)]).all()
    assert np.isfinite(np.asarray(grad)).all() and float(value) != float(value2)
    assert {"loss", "forget_loss", "retain_loss"} <= set(aux)
    if name != "rmu":  # RMU acts on hidden states; the unembedding gets no gradient
        assert float(jnp.abs(grad).sum()) > 0


def test_errors_name_what_to_fix():
    fwd = make_forward(THETA)
    with pytest.raises(ValueError, match="ref_logprob"):
        ob.npo()(fwd, FORGET)
    with pytest.raises(ValueError, match="ref_forward"):
        ob.kl_retain()(fwd, RETAIN)
    with pytest.raises(ValueError, match="unlearning batch"):
        ob.nll()(fwd, UNLEARN)
    with pytest.raises(ValueError, match="'retain'"):
        ob.grad_diff()(fwd, {"forget": FORGET})
    with pytest.raises(ValueError, match="'alternate'"):
        ob.dpo()(fwd, {"forget": FORGET}, ref_forward=make_forward(REF))
    with pytest.raises(ValueError, match="hidden state for decoder layer 7"):
        ob.rmu_forget()(fwd, FORGET)
    with pytest.raises(ValueError, match="ref_logprob"):
        ob.npo()(fwd, {**FORGET, "ref_logprob": np.zeros(B + 1, np.float32)})
    bad_hyperparameters = [
        lambda: ob.npo(0.0),
        lambda: ob.simnpo(-1.0),
        lambda: ob.dpo(0),
        lambda: ob.wga(-1.0),
        lambda: ob.flat("hellinger"),
        lambda: ob.ceu(-1),
        lambda: ob.pdu(retain_loss_eps=0.1, dual_update="sometimes"),
        lambda: ob.grad_diff(retain_loss="l2"),
        lambda: ob.rmu(steering_coeff=0.0),
    ]
    for bad in bad_hyperparameters:
        with pytest.raises(ValueError):
            bad()
    pre = {**FORGET, "ref_logprob": np.zeros(B, np.float32)}
    assert math.isfinite(float(evaluate(ob.npo(), pre)[0]))
