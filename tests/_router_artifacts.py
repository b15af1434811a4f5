"""Tiny artifacts for the router tests: a WordPiece tokenizer, a BERT config, a data dir.

Everything is built in the test's tmp_path from a handful of words, so the
export path runs end to end in seconds without the real encoder.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

WORDS = (
    "what is the capital of france solve for x and explain each step in spanish translate good "
    "morning bonjour answer a b c d which following true false number two three four five six "
    "seven eight nine ten how many eggs does she sell per day dollars market statement group "
    "order element prove that if then every field ring polynomial"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tokenizer(path: Path) -> Path:
    """A BERT-style WordPiece tokenizer.json ([CLS] a [SEP] b [SEP] post-processing)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tokens = dict.fromkeys(SPECIALS + sorted(set(WORDS)) + list("abcdefghijklmnopqrstuvwxyz0123456789"))
    vocab = {t: i for i, t in enumerate(tokens)}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault("##" + ch, len(vocab))
    for p in ".,?!:;'\"-+=()$":
        vocab.setdefault(p, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def build_bert(directory: Path, *, classifier: bool = False, num_labels: int = 3, seed: int = 0) -> Path:
    """A random-init 2-layer BERT (hidden 32) saved with its tokenizer.json."""
    import torch
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    directory.mkdir(parents=True, exist_ok=True)
    build_tokenizer(directory / "tokenizer.json")
    vocab_size = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size()
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config) if classifier else BertModel(config)
    model.save_pretrained(str(directory))
    return directory


def build_data_dir(root: Path, *, mmlu_rows: int = 60, gsm8k_rows: int = 30) -> Path:
    """A RouteLLM-layout data dir (mmlu, gsm8k, mt_bench) with synthetic, learnable labels."""
    import random

    rng = random.Random(0)
    weak, strong = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"
    (root / "mmlu").mkdir(parents=True)
    (root / "gsm8k").mkdir()
    (root / "mt_bench").mkdir()
    for domain in ("algebra", "marketing"):
        with (root / "mmlu" / f"mmlu_{domain}.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["prompt", weak, strong])
            for i in range(mmlu_rows // 2):
                hard = domain == "algebra"
                words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))
                w.writerow([f"{domain} {i}: {words}\nA. one\nB. two\nC. three\nD. four\nAnswer:",
                            (rng.random() > (0.7 if hard else 0.1)), (rng.random() > 0.1)])
        (root / "mmlu" / "contaminated_prompts.jsonl").write_text("")
    with (root / "gsm8k" / "gsm8k_responses.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", weak, strong, weak + "_response", strong + "_response"])
        for i in range(gsm8k_rows):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60)))
            w.writerow([f"problem {i}: {words}?", rng.random() > 0.4, rng.random() > 0.1, "the answer is 4", "so 4"])
    (root / "gsm8k" / "contaminated_prompts.jsonl").write_text("")
    qs, js = [], []
    for qid in range(1, 7):
        qs.append({"question_id": qid, "category": "writing", "turns": [f"write about {WORDS[qid]}", "now shorter"]})
        for model, base in ((weak, 6), (strong, 8)):
            for turn in (1, 2):
                js.append({"question_id": qid, "model": model, "judge": ["gpt-4", "single-v1"],
                           "user_prompt": f"[The Start of Assistant's Answer]\nanswer {qid}\n[The End of Assistant's Answer]",
                           "judgment": "ok", "score": base + rng.randint(-2, 2), "turn": turn, "tstamp": 0})
    (root / "mt_bench" / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    (root / "mt_bench" / "judgements.jsonl").write_text("".join(json.dumps(j) + "\n" for j in js))
    (root / "mt_bench" / "contaminated_prompts.jsonl").write_text("")
    return root
