"""Tiny offline tokenizers for randomly initialised test models (`pretrained=False`).

A byte-level BPE is trained in milliseconds on a fixed corpus with the `tokenizers` library, so it is
deterministic, needs no hub and covers any input string. Three styles mimic the special-token layout of
the real families: `causal` (Qwen/SmolLM: no BOS, pad = eos, ChatML chat template), `t5` (append `</s>`,
pad id 0) and `bert` (`[CLS] ... [SEP]`, pad id 0).
"""

from __future__ import annotations

from functools import cache

from transformers import PreTrainedTokenizerFast

_COLORS = "red green blue yellow purple orange cyan magenta white black gray pink brown".split()
_SHAPES = "circle square triangle star cross diamond ring hexagon".split()
_WORDS = (
    "a an the of and with on in to is are there one two three four small large big tiny left right above "
    "below next under over near picture photo image scene generate based following caption please showing "
    "contains sits placed at top bottom corner middle center background plain objects object shapes shape "
    "colored colour color dog cat sky tree house car sun river mountain beside between behind front"
).split()

_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    """A fixed training corpus covering the shapes-world vocabulary and common caption words."""
    lines = []
    for i, color in enumerate(_COLORS):
        for j, shape in enumerate(_SHAPES):
            other = _COLORS[(i + j + 1) % len(_COLORS)]
            lines.append(f"a {color} {shape} left of a {other} {_SHAPES[(j + 3) % len(_SHAPES)]}.")
            lines.append(f"Two {color} {shape}s above one {other} {shape}, on a plain background")
    lines.append(" ".join(_WORDS))
    lines.append("Please generate image based on the following caption: a picture of a dog under the sky")
    return lines


@cache
def tiny_tokenizer(style: str = "causal", vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Build (once per style) a small byte-level BPE tokenizer wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = {
        "causal": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "t5": ["<pad>", "</s>", "<unk>"],
        "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    }
    if style not in specials:
        raise ValueError(f"unknown tiny tokenizer style {style!r}; choose from {sorted(specials)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=style != "causal")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials[style],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    byte_level = processors.ByteLevel(trim_offsets=True)
    if style == "causal":
        tok.post_processor = byte_level
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|im_end|>",
            pad_token="<|im_end|>",  # as in SmolLM2: pad == eos, so padding must be masked explicitly
            additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
            chat_template=_CHATML,
            model_max_length=1024,
        )
    if style == "t5":
        template = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
        tok.post_processor = processors.Sequence([byte_level, template])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=1024
        )
    template = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    tok.post_processor = processors.Sequence([byte_level, template])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=1024,
    )
