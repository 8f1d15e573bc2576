"""Robustness audit of the `small` TOFU leaderboard: does each method's forgetting survive?

For each method: unlearn the `small` preset's target exactly as `jaxunlearn demo` does
(`pipeline.tofu.unlearn_method`, the preset's hyperparameters), then run the full audit
(`jaxunlearn.audit.suite.run_audit`: 8/4-bit RTN, relearning at {0, 10, 25, 50} steps,
REMIND, per-layer probes, trace detection) on the target, the unlearned model and the
retain oracle, and write one JSON line per method.

    PYTHONPATH=$PWD python benchmarks/audit_small.py --out audit_small.jsonl \
        --methods npo,gu_npo,graddiff,gradascent

Settings fixed before looking at any result: relearning uses AdamW at lr 1e-3 (the preset's
unlearning learning rate; its models are trained from scratch at 5e-3, so the 1e-5 of
Hu et al. for pretrained models would move nothing in 50 steps), batch 4, on 10% of the
forget items (4 of 40), measured on the other 36; RTN group size 128; 5 folds.

``--json-out PATH`` also writes one JSON dict: the machine, the command and every method's
record (``methods``), rewritten after each method. No torch side: no quiet gate.
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", default="npo,gu_npo,graddiff,gradascent,rmu,simnpo")
    parser.add_argument("--json-out", help="also write every method's record to this JSON file")
    args = parser.parse_args()
    records = []

    from jaxunlearn import checkpoints
    from jaxunlearn.audit.measures import ScoringOptions
    from jaxunlearn.audit.suite import AuditConfig, run_audit
    from jaxunlearn.data import tofu_holdout_split, tofu_perturbed_split
    from jaxunlearn.pipeline import tofu
    from jaxunlearn.pipeline.presets import get_preset

    preset = get_preset("small")
    split = preset.forget_splits[0]
    data = tofu.load_tofu_data(preset)
    models = tofu.prepare_models(preset, data=data, progress=False)
    tok = models.tokenizer
    target = checkpoints.load_pretrained(models.target_dir, dtype=jnp.float32)
    oracle = checkpoints.load_pretrained(models.oracle_dirs[split], dtype=jnp.float32)
    rows = data.eval_rows[split]
    forget, holdout = rows[tofu_perturbed_split(split)], rows[tofu_holdout_split(split)]
    prompts = [
        r["question"] for n in ("real_authors", "world_facts") for r in rows[f"{n}_perturbed"]
    ]
    retain = rows["retain_perturbed"]
    options = ScoringOptions(
        tofu.PROMPT_FORMAT, 64, buckets=preset.eval.buckets, max_length=preset.max_length
    )
    config = AuditConfig(
        relearn_steps=(0, 10, 25, 50), relearn_lr=1e-3, max_length=preset.max_length
    )
    for method in args.methods.split(","):
        start = time.perf_counter()
        unlearned, _, hyper = tofu.unlearn_method(
            tofu.MethodRun(method), target, tok, data, split, preset, progress=False
        )
        unlearn_s = time.perf_counter() - start
        res = run_audit(
            {"target": target, "unlearned": unlearned, "oracle": oracle}, tok, forget, holdout,
            trace_prompts=prompts, retain=retain, options=options, config=config, log=print,
        )  # fmt: skip
        from jaxunlearn.audit.report import verdicts

        record = {"method": method, "hyperparameters": hyper, "unlearn_seconds": unlearn_s,
                  "verdicts": verdicts(res), **res}  # fmt: skip
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
        print(method, "audit seconds", sum(res["seconds"].values()), flush=True)
        if args.json_out:
            from _quiet import write_json  # benchmarks/ is on sys.path when run as a script

            records.append(json.loads(json.dumps(record, default=float)))
            write_json(args.json_out, {"benchmark": "audit_small", "methods": records})


if __name__ == "__main__":
    main()
