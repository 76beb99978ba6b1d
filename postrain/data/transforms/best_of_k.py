"""`best_of_k` (RAFT, arXiv 2304.06767): scored samples become SFT rows {prompt, completion}, the best-scored one (or
the `keep` best, those scoring at least `min_score`) of each prompt. Settings under the source's `best_of_k:`."""

from __future__ import annotations

from postrain.data.rows import scored_groups
from postrain.data.transforms.pairing import check_score_key
from postrain.data.transforms.registry import TRANSFORMS
from postrain.errors import RecipeError


def _check(params: dict, spec: dict, where: str) -> None:
    check_score_key(params["score"], f"{where}.best_of_k.score")
    if params["keep"] is None and params["min_score"] is None:
        raise RecipeError(f"{where}.best_of_k: keep: null with no min_score keeps every sample; set min_score (e.g. "
                          f"1.0: the verified-correct samples) or keep (1: the best per prompt)")


# template_after=False: the samples' prompts were formatted by the eval run that sampled them.
@TRANSFORMS.register("best_of_k", section="best_of_k", rows_per_row=None, template_after=False,
                     columns=("prompt", "completion", "best_of_k.score"), ranges={"keep": ">= 1"}, check=_check,
                     empty="no prompt has a sample scoring at least best_of_k.min_score",
                     paper="RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment",
                     arxiv="2304.06767")
def best_of_k(rows: list[dict], where: str, *, score: str = "score", keep: int | None = 1,
              min_score: float | None = None) -> list[dict]:
    """RAFT's SFT data (arXiv 2304.06767 Sec. 3, "local ranking"; LMFlow RaftAligner._get_batch_dataset_local): per
    prompt, the `keep` highest-scored samples (1: RAFT's best-of-K; null: all; ties: the first sampled, as numpy's
    argmax), of those the ones scoring at least `min_score` (null: no threshold; 1.0 keeps only verified-correct
    samples); rows {prompt, completion, score} (+ answer where the samples have it). `score`: a column or
    `rewards.<name>`."""
    out = []
    for group in scored_groups(rows, where, "best_of_k", score):
        ranked = sorted(group, key=lambda g: -g[0])  # stable: equal scores keep their sampled order
        for s, row in ranked[:keep]:
            if min_score is None or s >= min_score:
                out.append({"prompt": row["prompt"], "completion": row["completion"], "score": s,
                            **({"answer": row["answer"]} if "answer" in row else {})})
    return out
