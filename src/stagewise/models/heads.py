"""A task head on a causal-LM backbone trained in an earlier stage (ULMFiT: LM -> classifier).

The head model is transformers' own `AutoModelForSequenceClassification` of the LM's
architecture and config, so `save_pretrained` output loads back with the Auto classes as it is.
The backbone's weights are carried by name, relative to the base model (`transformer.` in both
GPT-2 classes), so the LM's output layer is left behind and the new head starts from its init.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from stagewise.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def classifier_from_lm(lm: PreTrainedModel, num_classes: int, pad_id: int, where: str) -> tuple[PreTrainedModel, int]:
    """A sequence classifier with the LM's backbone weights; returns it and how many tensors were
    carried. `pad_id`: the padding token of the encoded texts; the classifier reads the logits at
    each row's last non-pad token, so it must not occur inside a text (the EOS of our tokenizers
    does not)."""
    from transformers import AutoModelForSequenceClassification, PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    arch = lm.config.model_type
    if not isinstance(lm, PreTrainedModel):
        raise UserError(where, f"classifier heads go on transformers causal LMs (model.arch '{arch}' is stagewise's own)")
    if arch not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise UserError(where, f"transformers has no sequence-classification head for '{arch}'")
    config = copy.deepcopy(lm.config)
    config.num_labels, config.pad_token_id = num_classes, pad_id
    config.id2label = {i: f"LABEL_{i}" for i in range(num_classes)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    model = AutoModelForSequenceClassification.from_config(config)
    carried = carry_weights(lm.base_model, model.base_model, where)
    return model, carried


@torch.no_grad()
def carry_weights(source: torch.nn.Module, target: torch.nn.Module, where: str) -> int:
    """Copy every tensor of `source` into the tensor of the same name in `target`; the target's
    other tensors keep their init. A same-named tensor of another shape means the two models
    differ in size (a stage changed the architecture): refused, as is nothing fitting at all."""
    have = source.state_dict()
    want = target.state_dict()
    for name, tensor in want.items():
        if name in have and have[name].shape != tensor.shape:
            raise UserError(where, f"the parent's weight '{name}' has shape {tuple(have[name].shape)}, the new "
                                   f"model's {tuple(tensor.shape)}: the head does not fit the parent")
    common = [name for name in want if name in have]
    if not common:
        raise UserError(where, "no weight of the parent model fits the new one (no tensor names in common)")
    target.load_state_dict({name: have[name] for name in common}, strict=False)
    return len(common)
