"""The `causal_lm` task: next-token prediction over windows of a token stream (data.sampler),
counted in tokens; validation is the token-weighted mean loss over the first validation windows.
A stage may read a weighted mix of sources instead (data.mixture): then each source is validated
on its own (`val_loss/<name>`) and `val_loss` is their mean weighted as the mix draws them (the
loss of the distribution the stage trains on, whatever the size of each validation set)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn
from torch.nn import functional as F

from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import ModelConfig
from stagewise.config.registry import arch_model
from stagewise.config.stage_config import StageConfig
from stagewise.data.mixture import MixedData, MixtureSampler, prepare_mixture
from stagewise.data.prepared_data import PreparedData
from stagewise.data.sampler import WindowSampler
from stagewise.data.tokenizers import count_unknown, to_transformers, warn_unknown
from stagewise.errors import UserError
from stagewise.models.adapters import ADAPTER_DIR, merged, save_adapter
from stagewise.models.build import build_model, context_length
from stagewise.models.generate import Stop, sample
from stagewise.models.gpt import GPT
from stagewise.tasks.base import Batch, BatchSource, Task
from stagewise.tasks.chat import ChatTemplate, directory_template
from stagewise.tasks.export import BUILTIN_FILE, TrainedStage, load_transformers, save_builtin, save_transformers
from stagewise.tasks.models import build_builtin
from stagewise.tasks.spec import LM_FAMILY, GenerateOptions, StageInput, StageSetup, TaskSpec, task_spec
from stagewise.tasks.traits import TaskTraits

# Inductor options of the compiled loss module. cpp.use_decompose_tanh: tanh as 2 / (1 + exp(-2x)) - 1
# on CPU instead of Sleef's tanh, which cost a 2-core CPU (1 thread) ~24% of a bf16 GPT-2 step in
# the GELU (gelu_new) forward and backward kernels alone; decomposed, those kernels run 2.3x faster
# and the whole step 1.17x (4x256 GPT-2) / 1.19x (6x384), batch 16x128, interleaved A/B, the same
# losses to 4 digits. Inductor leaves it off by
# default because the decomposed form loses relative precision near 0 (pytorch#148241: tanh fed
# into atan2), where GELU adds 1 to it. The CUDA (Triton) backend ignores it.
COMPILE_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"cpp.use_decompose_tanh": True}


def build_lm(cfg: ModelConfig, vocab_size: int, eos_id: int, plan_dir: Path) -> nn.Module:
    """The plan's causal LM: one stagewise builds (config.registry.ARCHS: gpt, plug-ins), else a
    transformers model from config or pretrained weights (models.build)."""
    if cfg.pretrained is None and arch_model(cfg.arch, LM_FAMILY) is not None:
        return build_builtin(cfg, task_spec(LM_FAMILY), {"vocab_size": vocab_size})
    return build_model(cfg, vocab_size, eos_id, plan_dir)


class LanguageModelLoss(nn.Module):
    """Model and loss as one module, so `torch.compile` sees (and fuses) the cross-entropy too."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # No KV cache: nothing reads it here, and a compiled forward would return it as extra outputs.
        self.no_cache = {"use_cache": False} if getattr(model.config, "use_cache", False) else {}

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of a batch; x, y: (B, T)."""
        logits = self.model(input_ids=x, **self.no_cache).logits  # (B, T, V)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


class LanguageModelTask(Task):
    kind = "causal_lm"
    unit = "tokens"

    def __init__(self, model: nn.Module, device: torch.device,
                 autocast: Callable[[], AbstractContextManager[None]], data: PreparedData | MixedData,
                 compile: bool) -> None:
        super().__init__(model, device, autocast)
        self.data = data
        module = LanguageModelLoss(model)
        self.loss_module: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
            torch.compile(module, options=COMPILE_OPTIONS) if compile else module)

    def sampler(self, block_size: int, batch_size: int, seed: int) -> BatchSource:
        if isinstance(self.data, MixedData):
            return MixtureSampler(self.data, block_size, batch_size, seed)
        return WindowSampler(self.data.train, block_size, batch_size, seed=seed)

    def loss(self, batch: Batch) -> torch.Tensor:
        x, y = batch
        with self.autocast():
            return self.loss_module(x, y)

    @torch.no_grad()
    def evaluate(self, block_size: int, batch_size: int, limit: int | None) -> dict[str, float]:
        """Token-weighted mean loss over the same validation windows every time (of a mix: of each
        source's, `limit` batches each, and their weighted mean)."""
        self.model.eval()
        if isinstance(self.data, MixedData):
            each = {f"val_loss/{s.name}": self._val_loss(s.data.val, block_size, batch_size, limit)
                    for s in self.data.sources}
            loss = sum(s.weight * each[f"val_loss/{s.name}"] for s in self.data.sources)
        else:
            each, loss = {}, self._val_loss(self.data.val, block_size, batch_size, limit)
        self.model.train()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), **each}

    def _val_loss(self, tokens: Any, block_size: int, batch_size: int, limit: int | None) -> float:
        val = WindowSampler(tokens, block_size, batch_size, seed=0, shuffle=False)
        total, count = torch.zeros((), device=self.device), 0
        for x, y in val.iter_eval(limit):
            x, y = x.to(self.device), y.to(self.device)
            total += self.loss((x, y)) * y.numel()
            count += y.numel()
        return (total / count).item()

    def corrupt(self, batch: Batch, step: int) -> Batch:
        """A batch of random tokens (the same for the same step), as a data pipeline bug would give."""
        x = batch[0]
        g = torch.Generator().manual_seed(step)
        bad = torch.randint(0, self.data.vocab_size, (x.size(0), x.size(1) + 1), generator=g).to(x.device)
        return bad[:, :-1].contiguous(), bad[:, 1:].contiguous()


def load_causal_lm(stage: TrainedStage) -> tuple[Any, Any]:
    """(model, transformers tokenizer) of a causal-LM export: stagewise's own GPT or a transformers model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (stage.directory / BUILTIN_FILE).is_file():
        model, _ = stage.builtin()
        return model, AutoTokenizer.from_pretrained(stage.directory)
    return load_transformers(stage.directory, AutoModelForCausalLM)


def continue_text(stage: TrainedStage, prompt: str, opts: GenerateOptions) -> str:
    """A sampled continuation of `prompt` (causal_lm, sft), 200 tokens at most unless told, ending
    at EOS, the chat template's end marker or a stop string: the prompt and its continuation;
    of a conversation (`opts.messages`, rendered with the stage's chat template), the reply."""
    model, tok = load_causal_lm(stage)
    template = stage_template(stage.directory)
    if opts.messages is not None:
        prompt = template.render(opts.messages, add_generation_prompt=True, where="--chat")
    # A rendered conversation has the special tokens its template gives it; a plain prompt the tokenizer's.
    ids = tok.encode(prompt, add_special_tokens=opts.messages is None) if prompt else [tok.eos_token_id]
    warn_unknown(count_unknown(tok.backend_tokenizer, [prompt]), "--chat" if opts.messages is not None else "--prompt",
                 "the prompt")
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop = lm_stop([tok.eos_token_id, *(config_eos if isinstance(config_eos, list) else [config_eos])],
                   lambda text: tok.encode(text, add_special_tokens=False),
                   lambda generated: tok.decode(generated, skip_special_tokens=True), template, opts.stop)
    out = sample(model, torch.tensor([ids]), opts.max_tokens or 200, context_length(model),
                 opts.temperature, opts.top_k, opts.top_p, generator=torch.Generator().manual_seed(opts.seed), stop=stop)
    generated, text = stop.cut(out[0, len(ids):].tolist())
    if opts.messages is not None:
        return (text if text is not None else tok.decode(generated, skip_special_tokens=True)).strip()
    if text is None:
        return tok.decode([*ids, *generated] if prompt else generated, skip_special_tokens=True)
    return (prompt + text) if prompt else text


def stage_template(directory: Path) -> ChatTemplate:
    """The chat template an export holds (tasks.chat), else the built-in one."""
    source = directory_template(directory)
    return ChatTemplate() if source is None else ChatTemplate(source, str(directory / "chat_template.jinja"))


def lm_stop(eos_ids: Iterable[int | None], encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
            template: ChatTemplate | None, strings: tuple[str, ...]) -> Stop:
    """Where a causal LM's continuation ends: its EOS tokens, the chat template's end marker (its
    token, when it is one, else the text) and the stop `strings`."""
    ids = {i for i in eos_ids if i is not None}
    marker = template.end_marker if template is not None else None
    if marker is not None:
        marker_ids = encode(marker)
        if len(marker_ids) == 1:
            ids.add(marker_ids[0])
        else:
            strings = (marker, *strings)
    return Stop(frozenset(ids), strings, decode)


@torch.no_grad()
def evaluate_text(stage: TrainedStage, path: Path, batch_size: int = 16) -> tuple[dict[str, float | None], int]:
    """Token-weighted next-token loss and perplexity of the model on a text file, in windows of
    its context length (the tail that fills no window is left out, as in training)."""
    if not path.is_file():
        raise UserError(str(path), "no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(str(path), f"not UTF-8: byte 0x{e.object[e.start]:02x} at offset {e.start}") from None
    model, tok = load_causal_lm(stage)
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    block = context_length(model)
    windows = (len(ids) - 1) // block
    if windows < 1:
        raise UserError(str(path), f"{len(ids)} tokens: too few for one window of {block + 1}")
    rows = ids[: windows * block + 1]
    x = rows[:-1].view(windows, block)  # (N, T)
    y = rows[1:].view(windows, block)
    total = 0.0
    for start in range(0, windows, batch_size):
        logits = model(input_ids=x[start:start + batch_size], use_cache=False).logits.float()  # (B, T, V)
        total += F.cross_entropy(logits.view(-1, logits.size(-1)), y[start:start + batch_size].reshape(-1),
                                 reduction="sum").item()
    loss = total / y.numel()
    return {"val_loss": loss, "val_ppl": math.exp(loss) if loss < 50 else None}, y.numel()


class CausalLMSpec(TaskSpec[PreparedData | MixedData]):
    name = "causal_lm"
    traits = TaskTraits(family=LM_FAMILY, metrics=("val_loss", "val_ppl", "train_loss"), data_keys=frozenset({"field"}),
                        reads="text files", arch_kind=LM_FAMILY, unit="tokens", samples=True, takes_adapters=True,
                        mixes=True, formats=("auto", "text", "json", "csv", "tsv", "parquet"),  # read by data.sources
                        counts="tokens")

    def prepare(self, inp: StageInput) -> tuple[PreparedData | MixedData, str]:
        if inp.own and inp.config.mix is None:
            raise UserError(inp.where, "a causal_lm stage reads the plan's data (the tokenizer is trained on it), "
                                       "or a mix of sources: data.mix")
        if inp.own:
            assert inp.cache_root is not None, "a mixture is encoded into the token cache"
            mixed = prepare_mixture(inp.config, inp.where, inp.lm_data.tokenizer, inp.plan.tokenizer, inp.plan_dir,
                                    inp.cache_root, inp.plan.seed)
            return mixed, mixed.fingerprint
        return inp.lm_data, inp.lm_data.fingerprint

    def n_train(self, data: PreparedData | MixedData) -> int:
        return data.n_train if isinstance(data, MixedData) else len(data.train)

    def bind(self, setup: StageSetup[PreparedData | MixedData], cfg: StageConfig, data_cfg: DataConfig, device: torch.device,
             autocast: Callable[[], AbstractContextManager[None]], compile: bool) -> Task:
        return LanguageModelTask(setup.model, device, autocast, setup.data, compile)

    def save(self, setup: StageSetup[PreparedData | MixedData], lm_tokenizer: Tokenizer | None, model_cfg: ModelConfig,
             out: Path) -> None:
        save_lm(setup, lm_tokenizer, model_cfg, out)

    def generate(self, stage: TrainedStage, prompt: str, opts: GenerateOptions) -> str:
        return continue_text(stage, prompt, opts)

    def evaluate_file(self, stage: TrainedStage, path: Path, fmt: str | None, beam: int) -> tuple[dict[str, Any], int]:
        return evaluate_text(stage, path)


def save_lm(setup: StageSetup[Any], lm_tokenizer: Tokenizer | None, model_cfg: ModelConfig, out: Path) -> None:
    """A causal LM (or a head on one) with the plan's tokenizer, as the Auto classes load them; a
    causal LM's tokenizer with the plan's chat template (`apply_chat_template` renders
    conversations as training did); an adapter stage's model merged, and its adapter in `adapter/`.
    A model stagewise builds (gpt, a plug-in's): its weights and model.json (tasks.export)."""
    assert lm_tokenizer is not None, "an LM-based stage has the plan's tokenizer"
    tok = to_transformers(lm_tokenizer)
    if setup.chat is not None:
        tok.chat_template = setup.chat.source
    if not hasattr(setup.model, "save_pretrained"):  # not transformers': with the tokenizer as AutoTokenizer loads it
        own = arch_model(model_cfg.arch, LM_FAMILY)
        assert own is not None, "a causal LM not of transformers is built from the plan's arch"
        settings = (setup.model.config.settings() if isinstance(setup.model, GPT)
                    else own.settings.model_validate(model_cfg.size_keys()).model_dump(mode="json"))
        save_builtin(setup.model, {"task": setup.task, "arch": model_cfg.arch, "settings": settings,
                                   "sizes": {"vocab_size": lm_tokenizer.get_vocab_size()}}, {}, out)
        tok.save_pretrained(out)
        return
    save_transformers(merged(setup.model), setup.labels, tok, out)
    if setup.adapter is not None and setup.adapter.lora is not None:  # and the adapter on its own (models.adapters)
        save_adapter(setup.model, out / ADAPTER_DIR, setup.adapter.base)
