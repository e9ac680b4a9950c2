"""Engine vs transformers on a random-weight model, judged against a float32 truth.

Two bf16 implementations of a 32-layer model never agree exactly: summation order differs, so
logits differ by bf16 noise and greedy paths split at near-ties. "Within bf16 tolerance" is
therefore measured, not assumed: transformers in bf16 is held to the same float32 truth (the
same weights upcast, teacher-forced on each side's own tokens), and our engine passes when
its error is of the same size as transformers' own.

Per prompt:
  - last-prompt logits: ‖x − fp32‖ / ‖fp32‖, ours vs HF-bf16's;
  - log-probs of the chosen tokens vs the fp32 log-probs of the same tokens (max abs error);
  - regret: how much the fp32 model preferred its argmax over the chosen token, worst step
    (0 = every choice was fp32's argmax; a bf16 engine picks within noise of it).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["engine_outputs", "fp32_truth", "hf_bf16_reference", "judge"]


def hf_bf16_reference(hf: Any, prompts: list[list[int]], new_tokens: int,
                      device: str) -> list[dict[str, Any]]:
    """HF's greedy tokens, their log-probs and the last-prompt logits, in the model's dtype."""
    refs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            tokens = out[0, len(prompt):].tolist()
            logits = hf(out).logits[0].float()  # [len(prompt) + n, vocab]
            logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)  # [n, vocab]
            chosen = logprobs.gather(1, torch.tensor(tokens, device=device)[:, None])[:, 0]
            refs.append({"tokens": tokens, "logprobs": chosen.cpu().tolist(),
                         "last_logits": logits[len(prompt) - 1].cpu()})
    return refs


def engine_outputs(engine: Any, prompts: list[list[int]], new_tokens: int,
                   generate: Any, tag: str = "parity") -> list[dict[str, Any]]:
    """Our greedy tokens (through the engine's normal decode path, graphs included), their
    log-probs, and the last-prompt logits from `engine.score`."""
    outputs, _ = generate(engine, prompts, new_tokens, tag)
    result = []
    for i, prompt in enumerate(prompts):
        toks = outputs[f"{tag}{i}"]
        result.append({"tokens": [t.id for t in toks], "logprobs": [t.logprob for t in toks],
                       "last_logits": engine.score(prompt).float().cpu()})
    return result


def fp32_truth(hf32: Any, prompt: list[int], tokens: list[int], device: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 last-prompt logits [vocab] and log-probs [n, vocab] along `tokens`."""
    with torch.inference_mode():
        ids = torch.tensor([prompt + tokens], device=device)
        logits = hf32(ids).logits[0].float()  # [len(prompt) + n, vocab]
        logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return logits[len(prompt) - 1].cpu(), logprobs.cpu()


def _errors(side: dict[str, Any], truth_last: torch.Tensor, truth_lp: torch.Tensor
            ) -> dict[str, float]:
    tokens = torch.tensor(side["tokens"])
    chosen = truth_lp.gather(1, tokens[:, None])[:, 0]  # fp32 log-prob of each chosen token
    return {
        "logits_rel_err": float((side["last_logits"] - truth_last).norm() / truth_last.norm()),
        "logprob_err": float((torch.tensor(side["logprobs"]) - chosen).abs().max()),
        "regret_nats": float((truth_lp.max(dim=-1).values - chosen).max()),
    }


def judge(hf32: Any, prompts: list[list[int]], ours: list[dict[str, Any]],
          theirs: list[dict[str, Any]], device: str, tie_nats: float) -> list[dict[str, Any]]:
    """One row per prompt; `ok` when our errors are of the size of HF-bf16's own."""
    rows = []
    for prompt, o, h in zip(prompts, ours, theirs, strict=True):
        last, lp_o = fp32_truth(hf32, prompt, o["tokens"], device)
        _, lp_h = fp32_truth(hf32, prompt, h["tokens"], device)
        eo, eh = _errors(o, last, lp_o), _errors(h, last, lp_h)
        same = next((j for j, (a, b) in enumerate(zip(o["tokens"], h["tokens"], strict=True))
                     if a != b), len(o["tokens"]))
        ok = (eo["logits_rel_err"] <= 1.5 * eh["logits_rel_err"] + 1e-3
              and eo["logprob_err"] <= 2 * eh["logprob_err"] + 0.02
              and eo["regret_nats"] <= max(2 * eh["regret_nats"], tie_nats))
        rows.append({"prompt_len": len(prompt), "tokens_equal_to_hf": same,
                     "of": len(o["tokens"]), "ours": eo, "hf_bf16": eh, "ok": ok})
        print(rows[-1], flush=True)
    return rows
