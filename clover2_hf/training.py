"""Teacher-forced distillation of a Clover-2 drafter from its frozen target (Trainer-based).

The target stays frozen and is never copied: it rides along as a plain attribute of the trainer
(not a submodule), and the drafter borrows its output head. Only drafter weights reach the
optimizer and the checkpoints.

Features come from the target ON THE FLY, inside `compute_loss`: one no-grad forward of the frozen
target gives the pre-norm last hidden states h_t (captured at the final norm's input). That is the
default because a precomputed store only pays for itself after more than one epoch. Measured with
`scripts/measure_features.py` on the project's 2-core CPU (SmolLM2-135M bf16 target, 8192-token draft
vocabulary, 60 ShareGPT conversations; docs/bench/measure_features.json): on-the-fly training 834
tokens/s, building a bf16 store 1513 tokens/s (1157 bytes/token), training from the store 1625
tokens/s, so break-even at 1.13 epochs. A CPU run covers less than one epoch; multi-epoch GPU recipes
(the paper's 20 epochs) should build a store first. The target's full-vocabulary distributions are
too large to store (V floats per position) and are recomputed from g = norm(h) in both designs. A precomputed store (`clover2_hf.tools.features`, `clover2 features`,
`clover2 train --features DIR`) holds h only; batches carrying `hidden_states` skip the decoder.

Loss (clover2_spec.md, "Training"): for depth i at position t (hidden state h_t, teacher token
x_{t+1}), the label is the target at position t + 1 + i:
    SmoothL1(o_i[t], g[t+1+i])                                  weight regression_loss_weight (v_w)
    CE(softmax(lm_head(g[t+1+i])), log_softmax(logits_i[t]))     weight distillation_loss_weight (p_w)
each a masked mean over valid positions, weighted by depth_decay ** i and summed over depths. A
position is valid for depth i when the token it drafts, x_{t+2+i}, exists and lies in an assistant
turn (`loss_mask`). With a truncated draft vocabulary the target's probabilities are read at the draft
vocabulary's ids (mass outside it is not renormalised: the drafter cannot draft those tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Trainer

from .generation.capture import PreNormCapture
from .modeling_clover2 import Clover2ForDrafting

__all__ = ["TargetFeatures", "target_features", "precomputed_features", "distillation_loss", "Clover2Trainer"]


@dataclass
class TargetFeatures:
    """What the losses need from the frozen target for a batch.

    hidden: [B, T, H] pre-norm last hidden states h_t (the drafter's input), or [B, T, (1 + k) H] with the
        outputs of k feature layers after h_t (`Clover2Config.feature_layers`).
    post_norm: [B, T, H] g_t = norm(h_t) (regression labels).
    """

    hidden: torch.Tensor
    post_norm: torch.Tensor


@torch.no_grad()
def target_features(target, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    feature_layers: list[int] | None = None) -> TargetFeatures:
    """Run the frozen target's decoder once (no lm_head) and capture h (and the feature layers) and g = norm(h)."""
    with PreNormCapture(target, feature_layers) as capture:
        target.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return TargetFeatures(hidden=capture.hidden, post_norm=capture.post_norm)


@torch.no_grad()
def precomputed_features(target, hidden: torch.Tensor) -> TargetFeatures:
    """Features from stored pre-norm hidden states h [B, T, H] (or [B, T, (1 + k) H], h first): g = norm(h).

    h is cast to the target's dtype and device first, so g is computed as `target_features` would
    (exactly so from a float32 store of a float32 target)."""
    norm = target.get_decoder().norm
    weight = getattr(norm, "weight", None)  # the norm's own device (a sharded target may spread layers)
    hidden = hidden.to(device=target.device if weight is None else weight.device, dtype=target.dtype)
    return TargetFeatures(hidden=hidden, post_norm=norm(hidden[..., : target.config.get_text_config().hidden_size]))


def _shift(x: torch.Tensor, offset: int, length: int) -> torch.Tensor:
    """x[:, offset : offset + length] zero-padded on the right to `length` (dim 1)."""
    part = x[:, offset : offset + length]
    pad = length - part.shape[1]
    if pad > 0:
        part = F.pad(part, (0, 0) * (x.dim() - 2) + (0, pad))
    return part


def distillation_loss(
    draft: Clover2ForDrafting,
    head_states: torch.Tensor,
    post_norm: torch.Tensor,
    loss_mask: torch.Tensor,
    top_k: int = 5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The Clover-2 loss and per-depth metrics.

    Args:
        draft: the drafter (its config gives weights and decay; its borrowed head scores o_i and g).
        head_states: [B, N, T, H] o_i from `draft(...)`.
        post_norm: [B, T, H] the target's g_t.
        loss_mask: [B, T] 1 on assistant tokens (0 on padding and everything else).
        top_k: k of the top-k accuracy metric.
    Returns:
        (loss, metrics) where metrics hold per-depth `loss_reg_{i}`, `loss_ce_{i}`, `top1_{i}`,
        `top{k}_{i}` (accuracy against the target's full-vocabulary argmax at the label position)
        and `valid_{i}` (number of positions scored).
    """
    cfg = draft.config
    B, N, T, H = head_states.shape
    loss_mask = loss_mask.to(head_states.device)
    # The target's distribution at each label position j (used by depths i = j - t - 1), computed once
    # per position rather than once per depth: positions whose next token is an assistant token.
    label_positions = _shift(loss_mask, 1, T).bool()  # [B, T]
    with torch.no_grad():
        head = draft.target_head
        g_rows = post_norm[label_positions].to(head.weight.dtype)  # [n_labels, H]
        target_logits = head(g_rows).float()  # [n_labels, V]
        target_best = target_logits.argmax(-1)  # [n_labels]
        target_probs = torch.softmax(target_logits, dim=-1)
        if draft.d2t is not None:
            target_probs = target_probs[:, draft.d2t.to(target_probs.device)]  # mass outside is not drafted
        del target_logits
        row_of = torch.full((B, T), -1, dtype=torch.long, device=head_states.device)
        row_of[label_positions] = torch.arange(int(label_positions.sum()), device=head_states.device)
    total = head_states.new_zeros((), dtype=torch.float32)
    metrics: dict[str, float] = {}
    for depth in range(N):
        # valid: the drafted token x_{t+2+depth} exists and is an assistant token
        valid = _shift(loss_mask, 2 + depth, T).bool()  # [B, T]
        count = int(valid.sum())
        metrics[f"valid_{depth}"] = count
        if count == 0:
            continue
        rows = _shift(row_of, 1 + depth, T)[valid]  # label rows at position t + 1 + depth
        o = head_states[:, depth][valid]  # [n, H]
        g = _shift(post_norm, 1 + depth, T)[valid]  # [n, H]
        reg = F.smooth_l1_loss(o.float(), g.float(), reduction="none").mean(-1).mean()
        draft_logits = draft.head_logits(o).float()  # [n, V_draft]
        ce = -(target_probs[rows] * torch.log_softmax(draft_logits, dim=-1)).sum(-1).mean()
        weight = cfg.depth_decay**depth
        total = total + weight * (cfg.regression_loss_weight * reg + cfg.distillation_loss_weight * ce)
        with torch.no_grad():
            k = min(top_k, draft_logits.shape[-1])
            ranked = draft.draft_to_target_ids(draft_logits.topk(k, dim=-1).indices)
            best = target_best[rows]
            metrics[f"loss_reg_{depth}"] = float(reg)
            metrics[f"loss_ce_{depth}"] = float(ce)
            metrics[f"top1_{depth}"] = float((ranked[:, 0] == best).float().mean())
            metrics[f"top{top_k}_{depth}"] = float((ranked == best[:, None]).any(-1).float().mean())
    return total, metrics


class Clover2Trainer(Trainer):
    """`transformers.Trainer` for a Clover-2 drafter; the frozen `target` computes features on the fly.

    Batches hold `input_ids`, `attention_mask` and `loss_mask` ([B, T]; see
    `clover2_hf.data.ConversationCollator`). Use `TrainingArguments(remove_unused_columns=False)`.
    A batch that also holds precomputed `hidden_states` [B, T, H] (a `clover2_hf.tools.features` store with
    `FeatureCollator`) skips the target's decoder: only its final norm (labels g = norm(h)) and its
    lm_head (target distributions) run.
    Evaluation reports the loss and per-depth top-1 / top-5 accuracy (token-weighted means).
    """

    def __init__(self, *args, target, **kwargs):
        super().__init__(*args, **kwargs)
        target.requires_grad_(False)
        target.eval()
        # a plain attribute, not a submodule: never optimised, never saved
        self.__dict__["target"] = target
        self._unwrapped_draft().attach_target(target)

    def _unwrapped_draft(self) -> Clover2ForDrafting:
        return self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model

    def _loss_and_metrics(self, model, inputs):
        ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        if "hidden_states" in inputs:  # precomputed h (clover2_hf.tools.features): only the target's norm runs
            features = precomputed_features(self.target, inputs["hidden_states"])
        else:
            features = target_features(self.target, ids.to(self.target.device), attention_mask,
                                       self._unwrapped_draft().config.feature_layers)
        draft = self._unwrapped_draft()
        next_ids = F.pad(ids[:, 1:], (0, 1))  # x_{t+1}; the last position has none (masked out)
        out = model(
            hidden_states=features.hidden.to(draft.dtype),
            next_input_ids=next_ids,
            attention_mask=attention_mask,
        )
        loss_mask = inputs["loss_mask"] * (attention_mask if attention_mask is not None else 1)
        return distillation_loss(draft, out.head_states, features.post_norm, loss_mask)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self._loss_and_metrics(model, inputs)
        if self.state.global_step % max(self.args.logging_steps, 1) == 0 and model.training:
            self._last_metrics = metrics
        return (loss, metrics) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        last = getattr(self, "_last_metrics", None)
        if last and "loss" in logs:
            logs.update({f"train_{k}": round(v, 4) for k, v in last.items() if k.startswith("top1_")})
        super().log(logs, *args, **kwargs)

    # replaces Trainer.evaluate, relying on Trainer's get_eval_dataloader, _prepare_inputs (private) and
    # callback_handler.on_evaluate; caught by tests/test_training.py::test_trainer_reduces_loss_saves_resumes_and_reloads
    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        dataloader = self.get_eval_dataloader(eval_dataset)
        model = self.model
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        loss_sum, batches = 0.0, 0
        for inputs in dataloader:
            inputs = self._prepare_inputs(inputs)
            loss, metrics = self._loss_and_metrics(model, inputs)
            loss_sum += float(loss)
            batches += 1
            for key, value in metrics.items():
                if key.startswith("valid_"):
                    continue
                depth = key.rsplit("_", 1)[1]
                n = metrics[f"valid_{depth}"]
                sums[key] = sums.get(key, 0.0) + value * n
                sums[f"_n_{key}"] = sums.get(f"_n_{key}", 0.0) + n
        results = {f"{metric_key_prefix}_loss": loss_sum / max(batches, 1)}
        for key, value in sums.items():
            if not key.startswith("_n_"):
                results[f"{metric_key_prefix}_{key}"] = value / max(sums[f"_n_{key}"], 1)
        model.train(was_training)
        self.log(results)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, results)
        return results
