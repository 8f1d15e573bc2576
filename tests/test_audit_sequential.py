"""Sequential deletion requests: the loop equals unlearning the requests by hand, in order."""

import numpy as np
import optax
import pytest
from _audit_tiny import FORGET, RETAIN, tiny_models

from jaxunlearn import objectives
from jaxunlearn.audit import measures, sequential
from jaxunlearn.data import ForgetRetainSampler, tokenize_records
from jaxunlearn.train import unlearn


def _sampler(tok, rows, seed=0):
    forget = tokenize_records(tok, rows, "raw", 64)
    retain = tokenize_records(tok, RETAIN, "raw", 64)
    return ForgetRetainSampler(forget, retain, batch_size=2, seed=seed)


@pytest.mark.slow
def test_sequential_equals_manual_chain():
    tok, _, _, model, _ = tiny_models()
    requests = [FORGET[0:2], FORGET[2:4]]
    samplers = [_sampler(tok, r) for r in requests]
    objective = objectives.forget_retain(objectives.grad_ascent(), objectives.nll())
    tx = optax.sgd(0.05)

    def forget(m, i):
        return measures.forget_measures(m, tok, requests[i]).aggregate

    def utility(m):
        return {"retain_prob": measures.forget_measures(m, tok, RETAIN).aggregate["prob"]}

    res = sequential.sequential_unlearning(
        model, samplers, objective, tx, steps=1, measure_forget=forget, measure_utility=utility
    )
    assert [r.requests_done for r in res.rows] == [0, 1, 2]
    assert [sorted(r.forget) for r in res.rows] == [[], [0], [0, 1]]
    # The same two unlearn calls by hand (each starts from the previous model).
    first = unlearn(model, objective, tx, samplers[0], steps=1, progress=False).model
    second = unlearn(first, objective, tx, samplers[1], steps=1, progress=False).model
    for row, m in ((res.rows[1], first), (res.rows[2], second)):
        for i, values in row.forget.items():
            want = measures.forget_measures(m, tok, requests[i]).aggregate
            for name, value in values.items():
                assert value == pytest.approx(want[name], rel=1e-5)
        assert row.utility["retain_prob"] == pytest.approx(utility(m)["retain_prob"], rel=1e-5)
    # Gradient ascent on request 0 lowers its probability below the start.
    start = measures.forget_measures(model, tok, requests[0]).aggregate["prob"]
    assert res.rows[1].forget[0]["prob"] < start
    table = res.table()
    assert len(table) == 3 and {"requests_done", "request", "prob", "utility/retain_prob"} <= set(
        table[0]
    )
    assert np.isfinite([t["prob"] for t in table]).all()


class _Result:
    def __init__(self, model, loss):
        self.model, self.metrics = model, [{"loss": loss}]


def test_sequential_bookkeeping(monkeypatch):
    """Order, starting models, references and steps of the unlearn calls (unlearn recorded)."""
    import jaxunlearn.train

    calls = []

    def fake_unlearn(model, objective, tx, data, *, steps, ref_model=None, **kw):
        calls.append((model, data, steps, ref_model, kw.get("progress")))
        return _Result(model + [data], float(len(model)))

    monkeypatch.setattr(jaxunlearn.train, "unlearn", fake_unlearn)
    seen = []

    def forget(m, i):
        seen.append((tuple(m), i))
        return {"n": float(len(m)), "i": float(i)}

    res = sequential.sequential_unlearning(
        [], ["a", "b", "c"], "obj", "tx", steps=[3, 4, 5], measure_forget=forget,
        measure_utility=lambda m: {"len": float(len(m))}, reference="initial", measure_all=True,
    )  # fmt: skip
    assert [(c[0], c[1], c[2], c[4]) for c in calls] == [
        ([], "a", 3, False), (["a"], "b", 4, False), (["a", "b"], "c", 5, False),
    ]  # fmt: skip
    assert all(c[3] == [] for c in calls)  # reference="initial": always the starting model
    assert res.model == ["a", "b", "c"]
    assert [r.utility["len"] for r in res.rows] == [0.0, 1.0, 2.0, 3.0]
    assert [r.final_loss for r in res.rows] == [None, 0.0, 1.0, 2.0]
    assert all(sorted(r.forget) == [0, 1, 2] for r in res.rows)  # measure_all
    assert seen[:3] == [((), 0), ((), 1), ((), 2)]
    calls.clear()
    res = sequential.sequential_unlearning(
        [], ["a", "b"], "obj", "tx", steps=1, measure_forget=forget,
        measure_utility=lambda m: {},
    )  # fmt: skip
    assert [c[3] for c in calls] == [None, None]  # "previous": unlearn's default reference
    assert [sorted(r.forget) for r in res.rows] == [[], [0], [0, 1]]


def test_sequential_bad_arguments():
    with pytest.raises(ValueError, match="no deletion requests"):
        sequential.sequential_unlearning(
            None, [], None, None, steps=1, measure_forget=None, measure_utility=None
        )
    with pytest.raises(ValueError, match="one positive int or 2"):
        sequential.sequential_unlearning(
            None, [1, 2], None, None, steps=[1], measure_forget=None, measure_utility=None
        )
    with pytest.raises(ValueError, match="reference"):
        sequential.sequential_unlearning(
            None, [1], None, None, steps=1, measure_forget=None, measure_utility=None,
            reference="first",
        )  # fmt: skip
