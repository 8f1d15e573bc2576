"""SSD on an image classifier: wall time vs retraining, and vs a plain torch SSD, in one run.

The same network and data in both frameworks: scikit-learn digits (1,347 train / 450 test,
full-class forgetting of one digit) and either the small CNN (`--model cnn`, the torch twin
is written out below with the same layout) or the ResNet-18-style network (`--model resnet18`,
the torch side is transformers' `ResNetForImageClassification` loaded from the NNX port's
Hugging Face export). Timed, in this one process:

- retraining: the oracle (retain data only) with the target's recipe, in JAX: the cost SSD
  avoids;
- jaxunlearn SSD (`classifiers.methods.ssd`: two batch-mean Fisher passes with
  `transforms.fisher_diagonal`, then `transforms.ssd`), cold (first call, includes XLA
  compilation) and warm (median of `--reps` further calls);
- torch SSD written plainly as the SSD paper's code computes it (per batch of 64: mean
  cross-entropy, backward, accumulate grad ** 2, divide by the number of batches; select
  where I_f > alpha · I_D; scale by min(lambda · I_D / I_f, 1)), median of `--reps` calls.

Both SSDs start from the same trained weights; the dampened parameters are compared (max
absolute difference) so the timings are of the same computation. The load average is
printed. The warm JAX and the torch calls are interleaved and, like every call timed here,
run only while other processes leave the CPUs idle (`--gate`, as in bench_model.py); when
the gate's deadline passes the ratios are stored marked "loaded".

    python benchmarks/bench_ssd_vision.py                    # CNN
    python benchmarks/bench_ssd_vision.py --model resnet18   # ResNet-18 (width 16)
    python benchmarks/bench_ssd_vision.py --json-out benchmarks/results/bench_ssd_vision_cnn.json
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile

import jax
import numpy as np
import torch
from _quiet import Gate, add_gate_args, add_json_arg, ratio_entry, write_json  # noqa: E402
from flax import nnx

from jaxunlearn import train
from jaxunlearn.checkpoints.vision import save_classifier
from jaxunlearn.classifiers import full_class, methods, predict, train_classifier
from jaxunlearn.classifiers.training import TrainRecipe
from jaxunlearn.data.images import load_digits
from jaxunlearn.models.vision import CNNConfig, ResNetConfig


class TorchCNN(torch.nn.Module):
    """The small CNN in torch: same layers, NHWC flatten order as the NNX model."""

    def __init__(self, cfg: CNNConfig):
        super().__init__()
        chans = (cfg.num_channels, *cfg.widths)
        self.convs = torch.nn.ModuleList(
            [torch.nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans[:-1], chans[1:])]
        )
        self.dense = torch.nn.Linear(cfg.pooled_size() ** 2 * chans[-1], cfg.hidden_size)
        self.classifier = torch.nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, x):  # x: NCHW
        for conv in self.convs:
            x = torch.relu(conv(x))
            if x.shape[2] >= 2:
                x = torch.nn.functional.max_pool2d(x, 2)
        x = x.permute(0, 2, 3, 1).flatten(1)
        return self.classifier(torch.relu(self.dense(x)))


def torch_twin(model, cfg):
    """(torch model, {torch param name: NNX path}) with the NNX model's weights."""
    if isinstance(cfg, CNNConfig):
        net = TorchCNN(cfg)
        state = nnx.state(model, nnx.Param)
        with torch.no_grad():
            for i, conv in enumerate(net.convs):
                k = np.asarray(state["convs"][i]["kernel"][...])
                conv.weight.copy_(torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
                conv.bias.copy_(torch.from_numpy(np.array(state["convs"][i]["bias"][...])))
            for name in ("dense", "classifier"):
                lin = getattr(net, name)
                lin.weight.copy_(torch.from_numpy(np.asarray(state[name]["kernel"][...]).T.copy()))
                lin.bias.copy_(torch.from_numpy(np.array(state[name]["bias"][...])))
        return net.eval()
    import transformers  # the ResNet's torch side is transformers' own implementation

    with tempfile.TemporaryDirectory() as d:
        save_classifier(model, f"{d}/m")
        return transformers.ResNetForImageClassification.from_pretrained(f"{d}/m").eval()


def torch_logits(net, x):
    out = net(x)
    return out.logits if hasattr(out, "logits") else out


def torch_ssd(net, full_loader, forget_loader, alpha, lam):
    """SSD as the paper's code computes it (importance, then in-place dampening)."""

    def importance(loader):
        imp = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
        for x, y in loader:
            net.zero_grad()
            torch.nn.functional.cross_entropy(torch_logits(net, x), y).backward()
            for n, p in net.named_parameters():
                if p.grad is not None:
                    imp[n] += p.grad.detach() ** 2
        return {n: v / len(loader) for n, v in imp.items()}

    i_full, i_forget = importance(full_loader), importance(forget_loader)
    with torch.no_grad():
        for n, p in net.named_parameters():
            where = i_forget[n] > alpha * i_full[n]
            beta = torch.clamp(lam * i_full[n][where] / i_forget[n][where], max=1.0)
            p[where] = p[where] * beta


def loaders(data, batch_size):
    x = torch.from_numpy(np.ascontiguousarray(data.images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(data.labels.astype(np.int64))
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("cnn", "resnet18"), default="cnn")
    ap.add_argument("--forget", default="3")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=10.0)
    ap.add_argument("--lam", type=float, default=1.0)
    add_json_arg(ap)
    add_gate_args(ap)
    args = ap.parse_args()
    gate = Gate(args.gate, args.max_wait)
    print(f"load average: {os.getloadavg()} | torch threads: {torch.get_num_threads()} | "
          f"jax: {jax.devices()}")  # fmt: skip
    splits = load_digits()
    task = full_class(splits, args.forget)
    if args.model == "cnn":
        cfg = CNNConfig(num_labels=10, num_channels=1, image_size=8)
    else:
        cfg = ResNetConfig.resnet18(10, 1, width=16)
    recipe = TrainRecipe(epochs=args.epochs, batch_size=64)
    target, _ = train_classifier(cfg, task.train, recipe)
    retrain_s, (oracle, _) = gate.once(lambda: train_classifier(cfg, task.retain_set(), recipe))

    graphdef, _, rest = train.split_model(target)
    loss = methods.ssd_loss(graphdef, rest)  # one loss object: later requests reuse the compile

    def jax_ssd():
        out = methods.ssd(target, task, alpha=args.alpha, lam=args.lam, batch_size=64, loss=loss)
        jax.block_until_ready(jax.tree.leaves(nnx.state(out)))
        return out

    cold, unlearned = gate.once(jax_ssd)

    order = np.r_[np.flatnonzero(task.retain), np.flatnonzero(task.forget)]
    full_dl, forget_dl = loaders(task.train.subset(order), 64), loaders(task.forget_set(), 64)
    x_test = torch.from_numpy(np.ascontiguousarray(task.test.images.transpose(0, 3, 1, 2)))
    twin = torch_twin(target, cfg)
    with torch.no_grad():
        parity = np.abs(
            torch_logits(twin, x_test).numpy() - predict(target, task.test.images)[0]
        ).max()
    net = torch_twin(target, cfg)
    start_state = copy.deepcopy(net.state_dict())

    def torch_call():  # from the target's weights each time (the restore is < 1 ms)
        net.load_state_dict(start_state)
        torch_ssd(net, full_dl, forget_dl, args.alpha, args.lam)

    times = gate.times({"jax_warm": jax_ssd, "torch": torch_call}, args.reps, warmup=0)
    warm, torch_s = times["jax_warm"], times["torch"]
    quiet = gate.record()
    with torch.no_grad():
        torch_out = torch_logits(net, x_test).numpy()
    jax_out = predict(unlearned, task.test.images)[0]
    agree = float(np.mean(torch_out.argmax(1) == jax_out.argmax(1)))
    acc = {
        name: 100 * float(np.mean(lg.argmax(1) == task.test.labels))
        for name, lg in (("jax", jax_out), ("torch", torch_out))
    }
    forget_acc = {
        name: 100 * float(np.mean(lg[task.forget_test].argmax(1) == args_label(task)))
        for name, lg in (("jax", jax_out), ("torch", torch_out))
    }
    med_warm, med_torch = statistics.median(warm), statistics.median(torch_s)
    print(f"\nmodel {args.model}, digits full-class '{args.forget}', forget {int(task.forget.sum())} "
          f"/ train {len(task.train)}, batch 64, alpha {args.alpha}, lambda {args.lam}")  # fmt: skip
    target_acc = 100 * float(
        np.mean(predict(target, task.test.images)[0].argmax(1) == task.test.labels)
    )
    oracle_acc = 100 * float(
        np.mean(predict(oracle, task.test.images)[0].argmax(1) == task.test.labels)
    )
    print(f"target logits, torch twin vs NNX: max |diff| {parity:.2e}")
    print(f"test acc: target {target_acc:.1f}, retrained oracle {oracle_acc:.1f}")
    print(f"test predictions of the two SSD results agree on {100 * agree:.1f}% of images; "
          f"test acc jax {acc['jax']:.1f} / torch {acc['torch']:.1f}; forget-test acc jax "
          f"{forget_acc['jax']:.1f} / torch {forget_acc['torch']:.1f}")  # fmt: skip
    print("\n| what | seconds | speed-up vs retrain |\n|---|---:|---:|")
    print(f"| retrain oracle ({args.epochs} epochs, JAX) | {retrain_s:.2f} | 1.0 |")
    print(f"| jaxunlearn SSD, cold (incl. compile) | {cold:.2f} | {retrain_s / cold:.1f} |")
    print(
        f"| jaxunlearn SSD, warm (median of {args.reps}) | {med_warm:.3f} | {retrain_s / med_warm:.1f} |"
    )
    print(f"| torch SSD (median of {args.reps}) | {med_torch:.3f} | {retrain_s / med_torch:.1f} |")
    verdict = "" if quiet["held"] else f" [LOADED, not a result: {quiet['reason']}]"
    print(f"\njaxunlearn warm vs torch: {med_torch / med_warm:.2f}x{verdict}")
    write_json(
        args.json_out,
        {
            "benchmark": "bench_ssd_vision",
            "model": args.model,
            "quiet_gate": quiet,
            "setup": f"digits full-class '{args.forget}', forget {int(task.forget.sum())} / train "
            f"{len(task.train)}, batch 64, alpha {args.alpha}, lambda {args.lam}, "
            f"{args.epochs} epochs",
            "parity_max_abs_logit_diff": float(parity),
            "test_acc": {"target": target_acc, "oracle": oracle_acc, **acc},
            "forget_test_acc": forget_acc,
            "prediction_agreement": agree,
            "seconds": {
                "retrain_oracle": retrain_s,
                "jax_cold": cold,
                "jax_warm_median": med_warm,
                "torch_median": med_torch,
                "jax_warm_all": warm,
                "torch_all": torch_s,
            },
            "reps": args.reps,
            "ratios": {
                "warm_vs_torch": ratio_entry(med_torch / med_warm, quiet),
                "warm_vs_retrain": ratio_entry(retrain_s / med_warm, quiet),
                "cold_vs_retrain": ratio_entry(retrain_s / cold, quiet),
                "torch_vs_retrain": ratio_entry(retrain_s / med_torch, quiet),
            },
        },
    )


def args_label(task):
    return task.forget_label


if __name__ == "__main__":
    main()
