"""What a training run shows at its end, as the notebooks of the Hugging Face recipe do: validation
perplexity before and after training, and the example sentence's top-k before and after."""

from __future__ import annotations

import mlm
from mlm.model import MaskedLM
from mlm.tokenizer import Tokenizer

TOP_K = 5


def top_k(model: MaskedLM, tokenizer: Tokenizer, text: str) -> list[dict]:
    """The example's candidates for its first mask: [{"token_str", "score"}], best first."""
    candidates = mlm.fill_mask(model, tokenizer, text, top_k=TOP_K)
    if candidates and isinstance(candidates[0], list):  # several masks: the first one's
        candidates = candidates[0]
    return [{"token_str": c["token_str"], "score": round(c["score"], 6)} for c in candidates]


def before_and_after(records: list[dict], example: str, after: list[dict], step: int) -> str:
    """The closing summary from metrics.jsonl's records (step 0's evaluation and example, the
    last evaluation) and the example's candidates now."""
    evaluations = [r for r in records if "val_ppl" in r]
    lines = []
    if evaluations:
        first, last = evaluations[0], evaluations[-1]
        lines.append(
            f"validation perplexity ({last['val_tokens']:,} masked tokens of held-out text): "
            f"{first['val_ppl']:,.2f} at step {first['step']} -> {last['val_ppl']:,.2f} at step "
            f"{last['step']}; accuracy {first['val_acc']:.1%} -> {last['val_acc']:.1%}"
        )
    if not after:
        return "\n".join(lines)
    before = next((r["example"] for r in records if r.get("example_text") == example), None)
    columns = [("before training", before)] if before else []
    columns.append((f"after {step} steps", after))
    width = max(len(c["token_str"]) for _, cands in columns for c in cands) + 8
    lines += ["", example, "  " + "".join(f"{title:<{width + 2}}" for title, _ in columns)]
    for i in range(TOP_K):
        cells = []
        for _, cands in columns:
            c = cands[i] if i < len(cands) else None
            text = f"{c['token_str']!s:<{width - 6}} {c['score']:.3f}" if c else ""
            cells.append(f"{text:<{width + 2}}")
        lines.append("  " + "".join(cells).rstrip())
    return "\n".join(lines)
