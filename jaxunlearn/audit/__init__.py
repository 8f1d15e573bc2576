"""Audits of an unlearning claim: does the forgetting survive attacks, and what did it cost?

Each check is a function of (model, data) returning per-item values and an aggregate:

- `quantize`: round-to-nearest 8/4-bit weight quantization and the recovery it causes;
- `relearn`: a short fine-tune on part of the forget set, forget metrics on the rest;
- `remind`: losses over token-substitution and paraphrase neighbourhoods (REMIND flatness
  features): AUC and TPR at 1% FPR, forget / retain / holdout 3-class AUC;
- `probe`: per-layer logistic-regression probes on hidden states, leave-items-out CV;
- `trace`: a classifier telling the original from the unlearned model by its outputs;
- `sequential`: deletion requests unlearned one after another.

`suite.run_audit` runs them all on the target, the unlearned model and the oracle side by
side, `suite.robustness_summary` reduces that to leaderboard columns, `report` writes the
Markdown / JSON / plots; the ``jaxunlearn audit`` command is `jaxunlearn.cli.audit`.
"""

from jaxunlearn.audit import (
    classify,
    measures,
    probe,
    quantize,
    relearn,
    remind,
    report,
    sequential,
    suite,
    trace,
)
from jaxunlearn.audit.classify import HeldOut, grouped_cv
from jaxunlearn.audit.measures import ForgetMeasures, ScoringOptions, forget_measures, recovery
from jaxunlearn.audit.probe import ProbeResult, representation_probe
from jaxunlearn.audit.quantize import changed_code_fraction, quantize_model, rtn_fake_quantize
from jaxunlearn.audit.relearn import RelearnCurve, relearn_curve, relearn_split
from jaxunlearn.audit.remind import RemindResult, remind_auc
from jaxunlearn.audit.sequential import SequentialResult, sequential_unlearning
from jaxunlearn.audit.suite import AuditConfig, robustness_summary, run_audit
from jaxunlearn.audit.trace import TraceResult, trace_detection

__all__ = [
    "AuditConfig",
    "report",
    "robustness_summary",
    "run_audit",
    "suite",
    "ForgetMeasures",
    "HeldOut",
    "ProbeResult",
    "RemindResult",
    "TraceResult",
    "classify",
    "grouped_cv",
    "probe",
    "remind",
    "remind_auc",
    "representation_probe",
    "trace",
    "trace_detection",
    "RelearnCurve",
    "ScoringOptions",
    "changed_code_fraction",
    "forget_measures",
    "measures",
    "quantize",
    "quantize_model",
    "recovery",
    "relearn",
    "relearn_curve",
    "relearn_split",
    "rtn_fake_quantize",
    "SequentialResult",
    "sequential",
    "sequential_unlearning",
]
