"""Unlearning evaluation: TOFU / MUSE metrics, membership inference, open-unlearning-style logs.

`metrics` turns per-token scores (`jaxunlearn.scores.TokenScores`) and per-item values into
the benchmark numbers, `mia` holds the membership-inference scores, AUC and PrivLeak, and
`report` reads and writes `*_EVAL.json` / `*_SUMMARY.json` logs compatible with
open-unlearning. Conventions and their sources (papers and public code) are given in the
module docstrings.
"""

from jaxunlearn.eval import metrics, mia, report
from jaxunlearn.eval.inference import (
    EvalResult,
    TokenArrays,
    collect_timings,
    enable_compilation_cache,
    generate_answers,
    score_items,
    score_packed,
)
from jaxunlearn.eval.metrics import (
    EPS,
    MODEL_UTILITY_KEYS,
    MUSE_KNOWMEM_STOPS,
    drop_last_label,
    exact_memorisation,
    extraction_strength,
    forget_quality,
    knowmem,
    length_normalised_loss,
    length_normalised_prob,
    model_utility,
    multi_answer_mean_loss,
    option_normalised_prob,
    rouge_l,
    rouge_scores,
    truncate_at_stops,
    truth_ratio,
    truth_ratio_closer_to_1,
    truth_ratio_true_better,
    verbmem,
)
from jaxunlearn.eval.mia import (
    MUSE_AUC_RETRAIN,
    PRIVLEAK_DEFAULT_RETAIN_AUC,
    gradnorm_score,
    gradnorm_scores,
    loss_score,
    mia_auc,
    min_k_plus_plus_score,
    min_k_score,
    muse_auc,
    privleak,
    privleak_muse,
    reference_score,
    zlib_score,
)
from jaxunlearn.eval.multiple_choice import evaluate_multiple_choice
from jaxunlearn.eval.muse import evaluate_muse
from jaxunlearn.eval.report import (
    METADATA_KEY,
    atomic_write_text,
    eval_metadata,
    forget_quality_from_logs,
    load_eval_logs,
    metric_result,
    mia_result,
    privleak_from_logs,
    probability_result,
    rouge_result,
    summarize,
    summary_markdown,
    truth_ratio_result,
    write_eval_logs,
)
from jaxunlearn.eval.tofu import evaluate_tofu

__all__ = [
    *metrics.__all__,
    *mia.__all__,
    *report.__all__,
    "metrics",
    "mia",
    "report",
    "EvalResult",
    "TokenArrays",
    "collect_timings",
    "enable_compilation_cache",
    "evaluate_multiple_choice",
    "evaluate_muse",
    "evaluate_tofu",
    "generate_answers",
    "score_items",
    "score_packed",
]
