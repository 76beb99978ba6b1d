"""Test hook for the multi-process GRPO comparison (tests/test_launch.py), imported by every Python process
started with this folder on PYTHONPATH (Python's `sitecustomize` mechanism), so also by the workers that
`accelerate launch` starts. Active only with POSTRAIN_TEST_FAKE_GENERATION=<group size>.

It replaces `generate` of transformers' models by a deterministic stand-in: the completion of a prompt depends on the
prompt's text and the row's place in its group, never on the process or the random state. HF sampling draws from
one random stream per process, so a 2-process run and a 1-process run of the same recipe would otherwise sample
different completions; with this stand-in both see the same ones, and everything postrain adds after generation
(rewards gathered over processes, advantages, dynamic sampling and its refill, the loss) can be compared exactly.

The row's place in its group: TRL's RepeatSampler puts each prompt's G copies next to each other in the generation
batch, and accelerate hands each process a contiguous slice of it (rank r holds rows r*B .. r*B + B - 1), so the
global row is rank * B + i and its place in the group is that modulo G.
"""

import hashlib
import os

_GROUP = os.environ.get("POSTRAIN_TEST_FAKE_GENERATION")

if _GROUP:
    import torch
    from transformers.generation.utils import GenerationMixin

    _original = GenerationMixin.generate

    def _fake_generate(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        from postrain.models.tiny import build_tokenizer

        tokenizer = build_tokenizer()
        group, rank = int(_GROUP), int(os.environ.get("RANK", 0))
        max_new = int(getattr(generation_config, "max_new_tokens", None) or 8)
        rows = []
        for i in range(input_ids.size(0)):
            ids = input_ids[i][attention_mask[i].bool()] if attention_mask is not None else input_ids[i]
            prompt = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
            place = (rank * input_ids.size(0) + i) % group
            digest = int(hashlib.sha256(f"{prompt}|{place}".encode()).hexdigest(), 16)
            text = ("A" if digest % 3 == 0 else "B") * (1 + digest % (max_new - 1))
            rows.append(tokenizer.encode(text, add_special_tokens=False)[: max_new - 1] + [tokenizer.eos_token_id])
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id
        completions = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=input_ids.device)
        return torch.cat([input_ids, completions], dim=1)

    GenerationMixin.generate = _fake_generate
