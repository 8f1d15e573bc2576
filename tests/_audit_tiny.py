"""Tiny random Llama models, a word-level tokenizer and TOFU items for the audit tests."""

import functools
import json

import numpy as np
import torch
import transformers

from jaxunlearn.data import TOFU_DIR


def rows(name: str, n: int) -> list[dict]:
    lines = (TOFU_DIR / f"{name}.json").read_text().splitlines()[:n]
    return [json.loads(x) for x in lines]


FORGET = rows("forget01_perturbed", 12)
HOLDOUT = rows("holdout01", 12)
RETAIN = rows("retain_perturbed", 6)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=128, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]
    )
    texts = [r["question"] + " " + r["answer"] for r in FORGET + HOLDOUT + RETAIN]
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    )  # fmt: skip


def llama_config(tokenizer, *, layers: int = 2, vocab: int = 128):
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip


def hf_model(config, seed: int = 0, noise: float = 0.05, base=None):
    """A random HF causal LM; with `base`, a copy of it with `noise` added (an 'unlearned' twin)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        if base is not None:
            model.load_state_dict(base.state_dict())
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return model


def torch_answer_loss(model, example) -> float:
    """Mean NLL of the scored labels of one tokenised example, computed with torch."""
    ids = torch.tensor(np.asarray(example["input_ids"])[None].astype(np.int64))
    labels = np.asarray(example["labels"]).astype(np.int64)
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1)
    target = torch.tensor(labels[1:])
    keep = target != -100
    return float(-logp[keep].gather(1, target[keep][:, None]).mean())


@functools.lru_cache(maxsize=1)
def tiny_models():
    """(tokenizer, hf target, hf unlearned twin, NNX target, NNX unlearned), built once."""
    from conftest import _nnx_twin

    tok = build_tokenizer()
    target = hf_model(llama_config(tok), seed=0, noise=0.05)
    unlearned = hf_model(target.config, seed=1, noise=0.02, base=target)
    return tok, target, unlearned, _nnx_twin(target), _nnx_twin(unlearned)
